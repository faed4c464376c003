"""Typed run configuration: dataclasses, YAML recipes, ``--set`` overrides.

A run is described by one ``RunConfig`` made of sections (model, data,
optimizer, schedule, train, checkpoint, logging). Each module receives only
its own section. Field names follow Megatron-Core's ``TransformerConfig`` and
``OptimizerConfig`` where such a name exists; a docstring under each field
says what it is and gives the Hugging Face ``DeepseekV3Config`` name where
that differs.

A recipe is a YAML file with the same nesting. Loading checks every value
against the field's type, rejects unknown keys, and runs each section's
``__post_init__`` checks, so a bad config fails before any work starts, in
one line that names the field.
"""
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from coom.errors import Adjusted, UserError

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


class ConfigError(UserError):
    """A config value that is unknown, of the wrong type or impossible."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"config field {name}: {problem}")
        self.name = name
        self.problem = problem


def _require(condition: bool, name: str, problem: str) -> None:
    if not condition:
        raise ConfigError(name, problem)


def _positive(section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value > 0, name, f"must be positive, got {value}")


@dataclass
class ModelConfig:
    """Shape of the DeepSeek-V3-style decoder: MLA attention, dense or
    DeepSeekMoE feed-forward blocks."""

    vocab_size: Optional[int] = None
    """Rows of the embedding and output head. None takes the tokenizer's
    vocabulary size; a value smaller than the tokenizer's is an error."""

    hidden_size: int = 256
    """Width of the residual stream."""

    num_layers: int = 4
    """Number of transformer blocks (HF: num_hidden_layers)."""

    num_attention_heads: int = 4
    """Attention heads per block."""

    ffn_hidden_size: int = 704
    """Inner width of the dense SwiGLU blocks (HF: intermediate_size)."""

    q_lora_rank: Optional[int] = None
    """Rank of the low-rank query projection (with an RMSNorm on the
    latent); None projects queries at full rank."""

    kv_lora_rank: int = 64
    """Width of the compressed key-value latent that MLA caches."""

    qk_nope_head_dim: int = 32
    """Query and key channels per head that carry no position."""

    qk_rope_head_dim: int = 16
    """Query and key channels per head rotated by RoPE; the key part is
    shared by all heads."""

    v_head_dim: int = 32
    """Value channels per head."""

    max_position_embeddings: int = 2048
    """Longest sequence the rotary tables are built for."""

    rotary_base: float = 10000.0
    """Base of the rotary position embedding (HF: rope_theta)."""

    rope_type: Literal["rope", "yarn"] = "rope"
    """Plain RoPE, or YaRN's frequency interpolation for long contexts."""

    rope_interleave: bool = True
    """Rotate channel pairs (2i, 2i+1) of the rope part, as DeepSeek's
    checkpoints lay them out; false pairs channel i with i + k/2 (k =
    qk_rope_head_dim), as Hugging Face's rotate_half does."""

    rotary_scaling_factor: float = 1.0
    """YaRN: context extension factor (HF: rope_scaling.factor)."""

    original_max_position_embeddings: int = 4096
    """YaRN: context length the model was trained at before scaling."""

    beta_fast: float = 32.0
    """YaRN: rotations above which frequencies are kept."""

    beta_slow: float = 1.0
    """YaRN: rotations below which frequencies are interpolated."""

    mscale: float = 1.0
    """YaRN: numerator coefficient of the cos/sin attention factor. 0, as
    transformers reads a config.json that leaves it out, makes that factor
    0.1 ln(rotary_scaling_factor) + 1."""

    mscale_all_dim: float = 1.0
    """YaRN: coefficient of the softmax-scale correction (squared) and the
    denominator of the cos/sin attention factor. 0, as transformers reads
    a config.json that leaves it out, turns the correction off and makes
    that factor 0.1 ln(rotary_scaling_factor) + 1."""

    first_k_dense_replace: int = 1
    """Leading blocks that use a dense MLP instead of MoE."""

    n_routed_experts: int = 0
    """Fine-grained routed experts per MoE block; 0 makes every block
    dense."""

    num_experts_per_tok: int = 2
    """Routed experts each token is sent to (top-k)."""

    n_shared_experts: int = 1
    """Experts every token goes through, fused into one SwiGLU of
    n_shared_experts * moe_intermediate_size."""

    moe_intermediate_size: int = 128
    """Inner width of each expert (Megatron: moe_ffn_hidden_size)."""

    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """Router affinity: sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2)."""

    norm_topk_prob: bool = True
    """Normalise the chosen experts' scores to sum to one."""

    routed_scaling_factor: float = 1.0
    """Multiplier of the routed experts' combined output."""

    n_group: int = 1
    """Expert groups for group-limited routing (DeepSeek-V3's node-limited
    routing); 1 turns it off."""

    topk_group: int = 1
    """Groups a token may choose experts from."""

    topk_method: Literal["noaux_tc", "group_limited_greedy"] = "noaux_tc"
    """How groups are ranked when n_group > 1, named as Hugging Face's
    configs name them: noaux_tc by the sum of a group's two best selection
    scores (DeepSeek-V3), group_limited_greedy by its best one
    (DeepSeek-V2)."""

    moe_router_enable_expert_bias: bool = True
    """Auxiliary-loss-free balancing: a per-expert bias, added to the
    scores for selection only, moved after every optimizer step."""

    moe_router_bias_update_rate: float = 1e-3
    """Step of the bias update, bias += rate * sign(mean load - load)
    (DeepSeek-V3: 0.001)."""

    moe_seq_aux_loss_coeff: float = 1e-4
    """Weight of DeepSeek-V3's sequence-wise balance loss (alpha); 0 turns
    it off."""

    moe_aux_loss_coeff: float = 0.0
    """Weight of the classic balance loss over the whole batch."""

    moe_z_loss_coeff: float = 0.0
    """Weight of the router z-loss, the mean squared log-sum-exp of the
    router logits."""

    mtp_num_layers: int = 0
    """Multi-Token Prediction depths D, each one block that predicts one
    token further ahead (HF: num_nextn_predict_layers)."""

    layernorm_epsilon: float = 1e-6
    """Epsilon of the blocks', MTP's and the final RMSNorms (HF:
    rms_norm_eps); MLA's q and kv latent norms always use 1e-6, as
    DeepSeek's and transformers' do."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight init (HF:
    initializer_range). Output projections are scaled down by
    sqrt(2 * num_layers)."""

    share_embeddings_and_output_weights: bool = False
    """Tie the output head to the embedding (HF: tie_word_embeddings)."""

    def __post_init__(self):
        _positive(self, "hidden_size", "num_layers", "num_attention_heads",
                  "ffn_hidden_size", "kv_lora_rank", "qk_rope_head_dim",
                  "v_head_dim", "max_position_embeddings", "rotary_base",
                  "rotary_scaling_factor", "layernorm_epsilon",
                  "init_method_std")
        for name in ("vocab_size", "q_lora_rank"):
            if getattr(self, name) is not None:
                _positive(self, name)
        for name in ("qk_nope_head_dim", "mtp_num_layers", "mscale",
                     "mscale_all_dim"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                 f"{self.qk_rope_head_dim} must be even for rotary pairs")
        _require(0 <= self.first_k_dense_replace <= self.num_layers,
                 "first_k_dense_replace", f"must lie in [0, num_layers="
                 f"{self.num_layers}]")
        if self.n_routed_experts:
            self._check_moe()

    def _check_moe(self):
        experts, groups = self.n_routed_experts, self.n_group
        _positive(self, "n_routed_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "n_group", "topk_group")
        for name in ("n_shared_experts", "moe_router_bias_update_rate",
                     "moe_seq_aux_loss_coeff", "moe_aux_loss_coeff",
                     "moe_z_loss_coeff"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(experts % groups == 0, "n_group",
                 f"{groups} does not divide n_routed_experts {experts}")
        _require(groups == 1 or experts // groups >= 2
                 or self.topk_method == "group_limited_greedy", "n_group",
                 "each group needs at least 2 experts (topk_method "
                 "noaux_tc ranks groups by their top-2 scores)")
        _require(self.topk_group <= groups, "topk_group",
                 f"{self.topk_group} exceeds n_group {groups}")
        reachable = self.topk_group * (experts // groups)
        _require(self.num_experts_per_tok <= reachable,
                 "num_experts_per_tok", f"{self.num_experts_per_tok} "
                 f"exceeds the {reachable} experts in topk_group groups")

    @property
    def qk_head_dim(self) -> int:
        """Query and key channels per head."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, index: int) -> bool:
        return self.n_routed_experts > 0 \
            and index >= self.first_k_dense_replace


@dataclass
class DataConfig:
    """Where training text comes from and how it becomes token samples."""

    paths: list[str] = field(default_factory=list)
    """Sources to train on. Each is a .txt file, a .jsonl file, a folder
    (every .txt and .jsonl file under it), or the prefix of an existing
    Megatron indexed dataset (PREFIX.bin and PREFIX.idx). Empty: the
    embedded default corpus, the Python standard library's source."""

    weights: Optional[list[float]] = None
    """Blend weight of each entry of paths (Megatron's --data-path
    weights). None weighs sources by their size."""

    text_key: str = "text"
    """Field holding the document text in .jsonl files."""

    tokenizer: Optional[str] = None
    """A Hugging Face tokenizer.json to use. None trains a byte-level BPE
    on the sources."""

    tokenizer_vocab_size: int = 8192
    """Vocabulary size of a tokenizer trained by COOM."""

    eod_token: str | None = None
    """The token written after each document (Megatron: the tokenizer's
    eod). None takes the eos_token of the tokenizer_config.json beside
    the tokenizer.json, as Megatron's preprocess_data.py does, and
    otherwise <|endoftext|>, the one special token of a tokenizer trained
    by COOM. A document whose text holds this token's string is split
    there (a warning says so once)."""

    seq_length: int = 256
    """Tokens per training sample."""

    split: str = "98,2,0"
    """Train, validation and test shares of the documents, as in
    Megatron's --split."""

    cache_dir: str = ".cache/coom"
    """Folder for tokenizers, prepared datasets and sample indices; reused
    while sources and tokenizer are unchanged."""

    num_workers: int = 2
    """Processes that tokenize the sources."""

    synthetic: bool = False
    """Train on uniformly random tokens instead of the sources, with no
    tokenizer (for benchmarks); model.vocab_size must then be set."""

    def __post_init__(self):
        _positive(self, "tokenizer_vocab_size", "seq_length", "num_workers")
        _require(self.tokenizer_vocab_size >= 257, "tokenizer_vocab_size",
                 "must be at least 257 (256 bytes plus end-of-document)")
        _require(self.eod_token != "", "eod_token",
                 "must name a token; leave it unset for the tokenizer's own")
        if self.weights is not None:
            _require(len(self.weights) == len(self.paths), "weights",
                     f"has {len(self.weights)} entries but paths has "
                     f"{len(self.paths)}")
            _require(all(w > 0 for w in self.weights), "weights",
                     "every weight must be positive")
        shares = self.split.replace("/", ",").split(",")
        try:
            values = [float(s) for s in shares]
        except ValueError:
            values = []
        _require(1 <= len(values) <= 3 and all(v >= 0 for v in values)
                 and len(values) > 1 and values[1] > 0 and values[0] > 0,
                 "split", f"'{self.split}' must look like '98,2,0' with "
                 "positive train and validation shares")


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

    def __post_init__(self):
        _positive(self, "lr", "adam_eps")
        _require(0 <= self.min_lr <= self.lr, "min_lr",
                 f"must lie in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, name, f"must lie in [0, 1), got {value}")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(self.clip_grad >= 0, "clip_grad", "must be >= 0")


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
        _require(self.lr_warmup_iters >= 0, "lr_warmup_iters", "must be >= 0")
        if self.lr_wsd_decay_iters is not None:
            _positive(self, "lr_wsd_decay_iters")
        for name in ("mtp_loss_scaling_factor",
                     "mtp_loss_scaling_factor_final"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(0 <= self.mtp_loss_switch_fraction <= 1,
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

    kernels: bool = True
    """Run COOM's fused Triton kernels on GPUs (``coom/kernels``); false
    runs the plain PyTorch references everywhere. CPUs always run the
    references."""

    def __post_init__(self):
        _positive(self, "steps", "micro_batch_size", "global_batch_size",
                  "eval_interval", "eval_iters")
        _require(self.global_batch_size % self.micro_batch_size == 0,
                 "global_batch_size",
                 f"{self.global_batch_size} is not a multiple of "
                 f"micro_batch_size {self.micro_batch_size}")
        if self.exit_interval is not None:
            _positive(self, "exit_interval")
        if self.exit_duration_in_mins is not None:
            _positive(self, "exit_duration_in_mins")


@dataclass
class FP8Config:
    """FP8 matrix products after DeepSeek-V3's fine-grained recipe
    (``coom/fp8``). Master weights, gradients and optimizer states stay
    float32; embedding, output head, router, norms and attention keep
    their precision."""

    recipe: Literal["off", "blockwise", "rowwise", "tensorwise"] = "off"
    """Scaling of the FP8 operands: 'blockwise' is DeepSeek-V3's (1 x 128
    tiles for activations and gradients, 128 x 128 blocks for weights);
    'rowwise' one scale per row; 'tensorwise' one per tensor; 'off' keeps
    every product in train.precision."""

    emulate: bool = False
    """Run the recipe as exact quantise-dequantise in float32 instead of
    on FP8 matrix units: slow, but on any device (CPUs, GPUs older than
    compute capability 8.9), for checking numerics."""

    power_of_two_scales: bool = False
    """Round every scale up to a power of two, so scaling changes only
    exponents."""

    experts: bool = True
    """Run the routed experts' grouped products in FP8 too."""

    high_precision_first_layers: int = 0
    """Transformer blocks at the start of the stack that keep
    train.precision for all their products."""

    high_precision_last_layers: int = 0
    """Blocks at the end of the main stack (before the MTP modules) that
    keep train.precision."""

    def __post_init__(self):
        for name in ("high_precision_first_layers",
                     "high_precision_last_layers"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(self.recipe in ("off", "blockwise") or self.emulate
                 or not self.experts, "experts",
                 f"FP8 expert products run with recipe blockwise only (or "
                 f"emulated); set fp8.experts=false for {self.recipe}")


ZERO_BUBBLE = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
"""Pipeline schedules that split each backward into input and weight
gradients."""


@dataclass
class ParallelConfig:
    """How a run launched with torchrun spreads over its processes: the
    degree of each kind of parallelism (``coom/parallel``,
    ``docs/distributed.md``). Their product is the world size."""

    data_parallel_replicate: int = 1
    """Data-parallel groups that each hold a full copy of the model
    (Megatron: the data-parallel size outside the distributed optimizer;
    with data_parallel_shard > 1 this is HSDP)."""

    data_parallel_shard: int = -1
    """Data-parallel processes that shard parameters, gradients and
    optimizer states among them (FSDP2); -1 takes whatever the other
    degrees leave of the world size."""

    tensor: int = 1
    """Tensor parallel degree (Megatron: tensor_model_parallel_size): MLA's
    query, key-value and output projections and the dense and shared
    expert feed-forwards split by heads and hidden units, the embedding
    and output head by vocabulary; norms, router and routed experts
    replicated (see sequence_parallel). Not yet with FP8."""

    expert: int = 1
    """Expert parallel degree (Megatron: expert_model_parallel_size): the
    routed experts split by expert over this many processes, which send
    each other their token copies with all-to-alls. They are taken from
    data_parallel_shard, which it must divide; the experts shard (FSDP)
    over the rest of the data-parallel processes. ``coom experts
    rebalance`` plans which rank holds which expert, with optional copies
    of hot ones."""

    pipeline: int = 1
    """Pipeline parallel degree (Megatron: pipeline_model_parallel_size):
    the blocks cut into stages that run on this many processes, each
    global batch's micro-batches flowing through them
    (``coom/parallel/pipeline.py``), each stage with its own tensor or
    expert parallelism if asked. Not yet with a tied embedding and head,
    nor with expert parallelism under the zero-bubble schedules."""

    pipeline_schedule: Literal[
        "1F1B", "GPipe", "Interleaved1F1B", "LoopedBFS",
        "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"] = "1F1B"
    """The order in which stages run their micro-batches' forwards and
    backwards (torch.distributed.pipelining's schedules). 1F1B and GPipe
    give each process one stage; the others give it
    pipeline_stages_per_process, looped (Interleaved1F1B, LoopedBFS,
    InterleavedZeroBubble) or in a V (ZBVZeroBubble, DualPipeV:
    DeepSeek-V3's DualPipe, whose first process also holds the last
    stage)."""

    pipeline_stages_per_process: int = 2
    """Stages each process holds under the multi-stage schedules (2 for
    the V-shaped ones); ignored by 1F1B and GPipe."""

    sequence_parallel: bool = False
    """With tensor > 1, also split the residual stream between the main
    blocks' sublayers by sequence over the tensor-parallel group
    (Megatron's sequence parallelism): its norms and activations take
    1 / tensor of the memory. data.seq_length must then split over
    tensor."""

    context: int = 1
    """Context parallel degree, reserved: must be 1."""

    def __post_init__(self):
        _positive(self, "data_parallel_replicate", "tensor", "expert",
                  "pipeline", "pipeline_stages_per_process", "context")
        _require(self.data_parallel_shard == -1
                 or self.data_parallel_shard > 0, "data_parallel_shard",
                 "must be positive, or -1 for the rest of the world size")
        _require(self.context == 1, "context",
                 "is not supported yet: COOM parallelises over data "
                 "(data_parallel_replicate, data_parallel_shard), tensor, "
                 "expert and pipeline only")
        _require(self.tensor > 1 or not self.sequence_parallel,
                 "sequence_parallel", "splits the sequence over the "
                 "tensor-parallel processes; set tensor > 1 or "
                 "sequence_parallel=false")
        _require(self.pipeline_stages_per_process == 2 or
                 self.pipeline_schedule not in ("ZBVZeroBubble",
                                                "DualPipeV"),
                 "pipeline_stages_per_process", "must be 2 for the "
                 f"V-shaped schedule {self.pipeline_schedule}")
        _require(self.pipeline == 1 or self.expert == 1
                 or self.pipeline_schedule not in ZERO_BUBBLE,
                 "pipeline_schedule", f"{self.pipeline_schedule} does not "
                 "run with expert parallelism yet (the routed experts are "
                 "FSDP units of their own, which reduce their gradients "
                 "before these schedules compute them); use 1F1B or "
                 "Interleaved1F1B, or parallel.expert=1")
        shard, expert = self.data_parallel_shard, self.expert
        _require(shard == -1 or shard % expert == 0, "expert",
                 f"{expert} does not divide data_parallel_shard {shard}; "
                 "expert-parallel processes are taken from "
                 "data_parallel_shard's")

    @property
    def pipeline_stages(self) -> int:
        """Stages the blocks are cut into."""
        if self.pipeline_schedule in ("1F1B", "GPipe"):
            return self.pipeline
        return self.pipeline * self.pipeline_stages_per_process


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    interval: int = 100
    """Save every this many steps (Megatron: save_interval); the last step
    is always saved."""

    keep: int = 2
    """Most recent checkpoints to keep; older ones are deleted."""

    init_from: Optional[str] = None
    """Start a new run from these model weights: a run directory, a
    checkpoint folder, or a Hugging Face DeepseekV3 folder (as written by
    ``coom convert``). The model section must match them; the optimizer,
    step and data position start fresh. Ignored once the run has a
    checkpoint of its own (Megatron: load with finetune)."""

    def __post_init__(self):
        _positive(self, "interval", "keep")


@dataclass
class LoggingConfig:
    """What the run reports and where."""

    log_interval: int = 10
    """Write a metrics.jsonl line and a TensorBoard point every this many
    steps."""

    tensorboard: bool = True
    """Write TensorBoard event files to the run directory."""

    progress_bar: bool = True
    """Show a console progress bar."""

    def __post_init__(self):
        _positive(self, "log_interval")


@dataclass
class EnergyConfig:
    """Energy accounting, the energy budget and the opt-in power-limit
    search (``coom/energy``, ``docs/energy.md``). Energy is metered
    wherever a meter is readable: GPUs through NVML, CPU packages through
    RAPL."""

    grid_gco2_per_kwh: float = 480.0
    """Carbon intensity of the electricity, in grams of CO2-equivalent per
    kWh, for the co2e_kg metric. The default is the world's average
    generation in 2023 (Ember, Global Electricity Review 2024); set your
    grid's."""

    budget_kwh: Optional[float] = None
    """Checkpoint and exit after the first step at which the run has used
    this many kWh, summed over all processes and metered sources and over
    resumed attempts. It needs a readable meter."""

    power_control: bool = False
    """Search the GPUs' power limits during the first steps and keep the
    one of least Zeus cost, restoring the original limit at exit. It
    changes hardware settings and needs administrator rights; off unless
    asked for. Not exercised on real GPUs in COOM's development."""

    power_control_eta: float = 0.5
    """Zeus's eta for the power-limit search: 1 minimises energy alone, 0
    time alone."""

    power_limits: list[float] = field(default_factory=list)
    """Power limits to try, in watts; empty: from the GPU's highest to its
    lowest limit in 25 W steps."""

    power_control_steps: int = 5
    """Measured training steps per power limit (after three warm-up steps
    of the run and one settling step per limit)."""

    def __post_init__(self):
        _require(self.grid_gco2_per_kwh >= 0, "grid_gco2_per_kwh",
                 "must be >= 0")
        if self.budget_kwh is not None:
            _positive(self, "budget_kwh")
        _require(0 <= self.power_control_eta <= 1, "power_control_eta",
                 f"must lie in [0, 1], got {self.power_control_eta}")
        _require(all(w > 0 for w in self.power_limits), "power_limits",
                 "every limit must be positive")
        _positive(self, "power_control_steps")


GROWTH_OPERATORS = ("depth", "mtp", "width", "add_experts", "split_experts",
                    "upcycle")
"""The operators of ``coom.growth`` (docs/growth.md)."""


@dataclass
class GrowthStep:
    """One growth of the model during a run."""

    step: int = 0
    """The optimizer step after which the model grows."""

    op: str = ""
    """The growth operator: one of GROWTH_OPERATORS."""

    args: dict = field(default_factory=dict)
    """The operator's arguments, e.g. {num_layers: 8}."""

    def __post_init__(self):
        _positive(self, "step")
        _require(self.op in GROWTH_OPERATORS, "op",
                 f"must be one of {', '.join(GROWTH_OPERATORS)}; got "
                 f"{self.op!r}")


@dataclass
class GrowthConfig:
    """Progressive model expansion (``coom/growth``, ``docs/growth.md``):
    the model grows in flight, keeping what it computes."""

    schedule: list[GrowthStep] = field(default_factory=list)
    """Growths in step order; several at one step apply in list order.
    Each is a mapping {step, op, args}, e.g. {step: 100, op: depth, args:
    {num_layers: 8}}. The recipe's model section is the model before the
    first."""

    def __post_init__(self):
        steps = [entry.step for entry in self.schedule]
        _require(steps == sorted(steps), "schedule",
                 f"steps must not decrease; got {steps}")


@dataclass
class RunConfig:
    """Everything that defines a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)

    def __post_init__(self):
        tensor = self.parallel.tensor
        for name in ("num_attention_heads", "ffn_hidden_size"):
            _require(getattr(self.model, name) % tensor == 0,
                     f"model.{name}", f"{getattr(self.model, name)} does "
                     f"not split over parallel.tensor {tensor}")
        shared = self.model.n_shared_experts * self.model.moe_intermediate_size
        _require(shared % tensor == 0, "model.moe_intermediate_size",
                 f"the shared experts' {shared} hidden units do not split "
                 f"over parallel.tensor {tensor}")
        _require(not self.parallel.sequence_parallel
                 or self.data.seq_length % tensor == 0, "data.seq_length",
                 f"{self.data.seq_length} does not split over "
                 f"parallel.tensor {tensor} (parallel.sequence_parallel)")
        _require(tensor == 1 or self.fp8.recipe == "off", "parallel.tensor",
                 "tensor parallelism does not run FP8 products yet; set "
                 "fp8.recipe=off or parallel.tensor=1")
        self._check_expert_parallel()
        self._check_pipeline()
        _require(not self.data.synthetic or self.model.vocab_size is not None,
                 "model.vocab_size", "must be set for data.synthetic")
        _require(self.data.seq_length <= self.model.max_position_embeddings,
                 "data.seq_length",
                 f"{self.data.seq_length} exceeds "
                 f"model.max_position_embeddings "
                 f"{self.model.max_position_embeddings}")
        if self.schedule.lr_warmup_iters > self.train.steps:
            # A recipe's warmup is sized for its own length; a short trial
            # run of it warms up over the whole run instead of failing.
            warnings.warn(Adjusted(
                f"schedule.lr_warmup_iters {self.schedule.lr_warmup_iters} "
                f"exceeds train.steps {self.train.steps}; warming up over "
                f"all {self.train.steps} steps"), stacklevel=2)
            self.schedule = dataclasses.replace(
                self.schedule, lr_warmup_iters=self.train.steps)
        last = max((entry.step for entry in self.growth.schedule),
                   default=0)
        _require(last < self.train.steps, "growth.schedule",
                 f"a growth at step {last} must come before the run's "
                 f"last step ({self.train.steps})")
        decay = self.schedule.lr_wsd_decay_iters
        _require(decay is None or self.schedule.lr_warmup_iters + decay
                 <= self.train.steps, "schedule.lr_wsd_decay_iters",
                 "warmup plus decay exceeds train.steps")

    def _check_expert_parallel(self):
        expert, experts = self.parallel.expert, self.model.n_routed_experts
        if expert == 1:
            return
        _require(experts % expert == 0 and experts > 0,
                 "model.n_routed_experts", f"{experts} routed experts do "
                 f"not split over parallel.expert {expert}; make it a "
                 f"positive multiple of {expert}")

    def _check_pipeline(self):
        parallel, model = self.parallel, self.model
        if parallel.pipeline == 1:
            return
        stages = parallel.pipeline_stages
        _require(stages <= model.num_layers, "parallel.pipeline",
                 f"{stages} stages ({parallel.pipeline_schedule}) need at "
                 f"least as many blocks, but model.num_layers is "
                 f"{model.num_layers}")
        _require(not model.share_embeddings_and_output_weights,
                 "parallel.pipeline", "a tied embedding and output head "
                 "(model.share_embeddings_and_output_weights) does not run "
                 "under pipeline parallelism yet")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value, annotation, name: str):
    """Return value as the annotated type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, name)
    if origin is Literal:
        word = {False: "off", True: "on"}.get(value) \
            if isinstance(value, bool) else None
        if word in args:
            value = word  # YAML reads a bare off or on as a boolean
        _require(value in args, name,
                 f"must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        _require(isinstance(value, list), name,
                 f"must be a list, got {value!r}")
        return [_check_type(v, args[0], f"{name}[{index}]")
                for index, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, f"{name}.")
    if annotation is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is float and isinstance(value, int) \
            and not isinstance(value, bool):
        return float(value)
    exact = annotation is not int or not isinstance(value, bool)
    _require(isinstance(value, annotation) and exact, name,
             f"must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    """Instantiate dataclass cls from a nested dict, checking every key."""
    _require(isinstance(values, dict), prefix.rstrip(".") or "recipe",
             f"must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        _require(key in known, name,
                 f"unknown key; known keys here: {', '.join(sorted(known))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{name}.")
        else:
            kwargs[key] = _check_type(value, hint, name)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        if error.name.startswith(prefix):
            raise
        raise ConfigError(prefix + error.name, error.problem) from None


def _apply_override(tree: dict, assignment: str) -> None:
    """Apply one 'section.field=value' assignment to a nested dict."""
    key, sep, text = assignment.partition("=")
    _require(bool(sep) and bool(key), assignment,
             "an override must look like section.field=value")
    *sections, leaf = key.strip().split(".")
    node = tree
    for section in sections:
        node = node.setdefault(section, {})
        _require(isinstance(node, dict), key, "is not a section")
    try:
        node[leaf] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(key.strip(), f"--set value {text!r} is not valid "
                          f"YAML ({_first_line(error)})") from None


def recipe_path(recipe: str) -> Path:
    """Resolve a recipe name (coom/recipes/NAME.yaml) or a YAML path."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist")
        return path
    path = RECIPE_DIR / f"{recipe}.yaml"
    if path.parent != RECIPE_DIR or not path.is_file():
        names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
        raise UserError(f"unknown recipe '{recipe}'; known recipes: "
                        f"{', '.join(names)}, or give a path to a .yaml file")
    return path


def _first_line(error: Exception) -> str:
    """The first line of error's message, or its type when it has none."""
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__


def read_yaml(path: Path):
    """The YAML document in path (a recipe, a run's config.yaml), or one
    line that says why it cannot be read."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}); "
                        "save it as UTF-8") from None
    except OSError as error:
        raise UserError(f"{path} cannot be read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: "
                        f"{_first_line(error)}") from None


def _merged(base: dict, changes: dict) -> dict:
    """base with changes applied, sections merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merged(out[key], value)
        out[key] = value
    return out


def _read_recipe(recipe: str, seen: tuple = ()) -> dict:
    """A recipe's tree, on top of the recipe its ``base`` key names."""
    path = recipe_path(recipe)
    _require(path not in seen, "base", f"recipe {path} includes itself")
    tree = read_yaml(path) or {}
    _require(isinstance(tree, dict), "recipe", f"{path} is not a mapping")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError("base", f"must be a recipe name, got {base!r}")
    if base.endswith((".yaml", ".yml")):
        base = str(path.parent / base)
    return _merged(_read_recipe(base, (*seen, path)), tree)


def load_config(recipe: Optional[str] = None,
                overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a recipe (and the recipe its ``base`` key names, which it
    changes), apply ``--set`` overrides, and validate the result."""
    tree = _read_recipe(recipe) if recipe is not None else {}
    return config_from_tree(tree, overrides)


def config_from_tree(tree: dict, overrides: list[str] | None = None
                     ) -> RunConfig:
    """The config of a recipe's tree (changed in place) with ``--set``
    overrides applied, validated."""
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    return _build(RunConfig, tree, "")


def _field_docstrings(cls) -> dict[str, str]:
    """The string literal under each field of dataclass cls."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and \
                isinstance(following, ast.Expr) and \
                isinstance(following.value, ast.Constant):
            text = " ".join(following.value.value.split())
            docs[node.target.id] = text
    return docs


def config_reference() -> str:
    """Markdown reference of every section and field, from the code."""
    lines = ["# Configuration reference", "",
             "Generated from `coom/config.py` by "
             "`python -m coom.config > docs/config.md`; a test keeps it in "
             "step with the code.", ""]
    for section in dataclasses.fields(RunConfig):
        cls = section.type
        lines += [f"## `{section.name}`", "", cls.__doc__.strip(), "",
                  "| field | default | meaning |", "|---|---|---|"]
        docs = _field_docstrings(cls)
        defaults = cls()
        for item in dataclasses.fields(cls):
            default = yaml.safe_dump(getattr(defaults, item.name),
                                     default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix(" ...")
            lines.append(f"| `{item.name}` | `{default}` | "
                         f"{docs[item.name]} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference(), end="")
