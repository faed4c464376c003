"""The sections of the training loop: optimizer, learning-rate schedule
and the loop itself."""
from dataclasses import dataclass, field
from typing import Literal, Optional

from coom.config.anomaly import AnomalyConfig
from coom.config.checks import positive, require


@dataclass
class OptimizerConfig:
    """AdamW with decoupled weight decay and gradient clipping."""

    lr: float = 3e-3
    """Peak learning rate."""

    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""

    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices but not to norms or
    biases."""

    adam_beta1: float = 0.9
    """AdamW's first-moment decay."""

    adam_beta2: float = 0.95
    """AdamW's second-moment decay."""

    adam_eps: float = 1e-8
    """AdamW's denominator epsilon."""

    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""

    moments_dtype: Literal["auto", "float32", "bf16"] = "auto"
    """AdamW's moments: bf16, as DeepSeek-V3 keeps them, holds 4 bytes
    fewer per parameter and moves 8 fewer a step; the step still computes
    in float32 and rounds them to nearest. 'auto' is bf16 where the
    model computes in bf16 (train.precision) and float32 otherwise."""

    def __post_init__(self):
        positive(self, "lr", "adam_eps")
        require(0 <= self.min_lr <= self.lr, "min_lr",
                f"must lie in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            require(0 <= value < 1, name, f"must lie in [0, 1), got {value}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.clip_grad >= 0, "clip_grad", "must be >= 0")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over train.steps."""

    lr_decay_style: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    """Shape after warmup: cosine to min_lr, warmup-stable-decay, linear to
    min_lr, or constant."""

    lr_warmup_iters: int = 50
    """Steps of linear warmup from zero."""

    lr_wsd_decay_iters: Optional[int] = None
    """For wsd: length of the final decay. None uses the last 20% of the
    steps."""

    lr_wsd_decay_style: Literal["linear", "cosine"] = "linear"
    """For wsd: shape of the final decay."""

    mtp_loss_scaling_factor: float = 0.3
    """Weight lambda of the mean MTP loss early in training (DeepSeek-V3:
    0.3)."""

    mtp_loss_scaling_factor_final: float = 0.1
    """Weight of the mean MTP loss after mtp_loss_switch_fraction of the
    steps (DeepSeek-V3: 0.1)."""

    mtp_loss_switch_fraction: float = 0.7
    """Share of train.steps after which the final MTP weight applies
    (DeepSeek-V3 switched after 10T of 14.8T tokens)."""

    def __post_init__(self):
        require(self.lr_warmup_iters >= 0, "lr_warmup_iters", "must be >= 0")
        if self.lr_wsd_decay_iters is not None:
            positive(self, "lr_wsd_decay_iters")
        for name in ("mtp_loss_scaling_factor",
                     "mtp_loss_scaling_factor_final"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(0 <= self.mtp_loss_switch_fraction <= 1,
                "mtp_loss_switch_fraction", "must lie in [0, 1]")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 300
    """Optimizer steps to train for (Megatron: train_iters)."""

    micro_batch_size: int = 16
    """Samples per forward and backward pass."""

    global_batch_size: int = 16
    """Samples per optimizer step; a multiple of micro_batch_size, the
    quotient being the gradient accumulation steps."""

    seed: int = 1234
    """Seed of weights, data order and every random generator."""

    device: str = "auto"
    """Torch device: 'auto' takes cuda when present, else cpu."""

    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute precision: 'auto' is bf16 autocast on GPU and float32 on
    CPU. Weights and optimizer states are always float32."""

    eval_interval: int = 50
    """Compute the validation loss every this many steps and at the
    end."""

    eval_iters: int = 8
    """Micro-batches of the fixed validation set per evaluation."""

    eval_iters_per_language: int = 1
    """Where the sources name languages, micro-batches of each language's
    own validation set per evaluation, logged as val_loss/LANG and
    val_bpb/LANG (0: none)."""

    exit_interval: Optional[int] = None
    """Checkpoint and exit once the step is a multiple of this, keeping the
    schedule of the full run (for time-sliced jobs)."""

    exit_duration_in_mins: Optional[float] = None
    """Checkpoint and exit after the first step that ends this many minutes
    after the job started, growths included (Megatron:
    exit_duration_in_mins), for jobs with a wall-clock limit; the time of
    one step and one checkpoint must fit in what the job has left."""

    compile: bool = False
    """Compile each transformer block with ``torch.compile`` (as
    torchtitan does); the first steps then take longer."""

    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation per transformer block, trading compute for
    memory (Megatron: recompute_granularity; torchtitan:
    activation_checkpoint.mode): 'full' keeps only each block's input and
    runs its forward again in the backward; 'selective' keeps the outputs
    of matrix products, attention and collectives and recomputes the
    element-wise work around them (``coom/parallel/recompute.py``)."""

    watchdog_minutes: Optional[float] = None
    """A step (with its evaluation and checkpoint) that takes longer than
    this dumps every process's Python stacks into the run's hangs/ and
    ends the process with exit code 1, for a scheduler to restart the
    job (``docs/resilience.md``). None: no watchdog."""

    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    """Loss spikes and non-finite steps: what they do."""

    kernels: bool = True
    """Run COOM's fused Triton kernels on GPUs (``coom/kernels``); false
    runs the plain PyTorch references everywhere. CPUs always run the
    references."""

    def __post_init__(self):
        positive(self, "steps", "micro_batch_size", "global_batch_size",
                 "eval_interval", "eval_iters")
        require(self.eval_iters_per_language >= 0, "eval_iters_per_language",
                "must be >= 0")
        require(self.global_batch_size % self.micro_batch_size == 0,
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of "
                f"micro_batch_size {self.micro_batch_size}")
        if self.exit_interval is not None:
            positive(self, "exit_interval")
        if self.exit_duration_in_mins is not None:
            positive(self, "exit_duration_in_mins")
        if self.watchdog_minutes is not None:
            positive(self, "watchdog_minutes")
