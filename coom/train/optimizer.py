"""AdamW with decoupled weight decay, and the learning-rate schedules.

The schedule is a pure function of the step, so a resumed run needs only
the step to continue it exactly.
"""
import collections
import math
from typing import Optional

import torch
from torch import nn

from coom.config import OptimizerConfig, ScheduleConfig
from coom.kernels.adamw import adamw_step
from coom.models.info import decays
from coom.parallel.mesh import local_tensor
from coom.parallel.precision import ComputeWeights

MOMENTS_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


class FusedAdamW(torch.optim.AdamW):
    """torch's AdamW, stepped by COOM's kernel (``coom.kernels.adamw``):
    every tensor of a group in one launch, clipping's coefficient applied
    in the same pass, the moments in float32 or bf16 (DeepSeek-V3's).
    Where there are compute weights (``ComputeWeights``) the step also
    writes each parameter's bf16 copy, so the next step needs no cast of
    the masters, and reads each gradient where they hold it (the copies
    keep bf16 ones in a step of one micro-batch). Sharded parameters
    (DTensors: FSDP's, tensor parallelism's) step by their local shards.
    Its state is torch's, so checkpoints of either load into the other.

    Args:
        groups: the parameter groups.
        weights: the compute weights whose copies the step writes, if
            any.
        moments_dtype: the moments' dtype, float32 or bf16.
        settings: AdamW's lr, betas, eps.
    """

    def __init__(self, groups: list[dict],
                 weights: Optional[ComputeWeights] = None,
                 moments_dtype: torch.dtype = torch.float32, **settings):
        super().__init__(groups, **settings)
        self.weights = weights
        self.moments_dtype = moments_dtype
        self.stepped: list[torch.nn.Parameter] = []
        """The parameters the last step counted."""
        # torch's load_state_dict casts every state tensor to its
        # parameter's dtype.
        self.register_load_state_dict_post_hook(_moments_as_configured)

    @torch.no_grad()
    def step(self, closure=None, grad_scale: Optional[torch.Tensor] = None,
             applies: Optional[torch.Tensor] = None):
        """The step of the gradients times grad_scale (clipping's
        coefficient, ``clip_coefficient``), which stay as they are: one
        launch for each group's tensors of one step count and gradient
        dtype. grad_scale and applies are one-element tensors on the
        parameters' device (by default 1 and true): where applies is
        false the device leaves everything as it was, and the caller,
        once it knows, calls ``forget_step`` to take back the step
        counts."""
        if closure is not None:
            raise ValueError("FusedAdamW takes no closure")
        written = []
        for group in self.param_groups:
            for (step, _), members in self._batches(group).items():
                parameters = [member[0] for member in members]
                # Copies exist only outside FSDP: never DTensors.
                copies = [] if self.weights is None else [
                    self.weights.masters[p] for p in parameters]
                adamw_step(*(list(map(local_tensor, column)) for column in
                             zip(*members)), copies,
                           group["lr"], *group["betas"], group["eps"],
                           group["weight_decay"], step, grad_scale, applies)
                written += parameters
        self.stepped = written
        if self.weights is not None:
            # Only the copies it wrote: one without a gradient keeps its
            # version, and is cast again if its master changes. (A step
            # the device held back left copies and masters alike.)
            self.weights.made_fresh(written)

    def forget_step(self) -> None:
        """Take back the step counts of the last step, which the device
        held back (``step``'s applies)."""
        for parameter in self.stepped:
            self.state[parameter]["step"] -= 1
        self.stepped = []

    def _batches(self, group: dict) -> dict:
        """group's parameters with a gradient, as (parameter, gradient,
        first moment, second moment), by step count (after this step)
        and gradient dtype; each one's state made or counted on."""
        batches = collections.defaultdict(list)
        for parameter in group["params"]:
            grad = parameter.grad if self.weights is None \
                else self.weights.gradient(parameter)
            if grad is None:
                continue
            state = self.state[parameter]
            if not state:
                state["step"] = torch.tensor(0.0)
                for name in ("exp_avg", "exp_avg_sq"):
                    state[name] = torch.zeros_like(
                        parameter, dtype=self.moments_dtype)
            # A checkpoint of torch's fused AdamW keeps the step on the
            # device; the host needs it for the bias corrections.
            state["step"] = state["step"].cpu() + 1
            batches[int(state["step"]), grad.dtype].append(
                (parameter, grad, state["exp_avg"], state["exp_avg_sq"]))
        return batches

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients, the masters' and those the copies keep
        (``ComputeWeights.keep_gradients``)."""
        super().zero_grad(set_to_none)
        if self.weights is not None:
            self.weights.clear_gradients()


def _moments_as_configured(optimizer: FusedAdamW) -> None:
    """Cast optimizer's loaded moments back to its moments' dtype."""
    for state in optimizer.state.values():
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name] = state[name].to(optimizer.moments_dtype)


def moments_dtype(setting: str, compute: torch.dtype) -> torch.dtype:
    """The moments' dtype that optimizer.moments_dtype names for a model
    computing in dtype compute: 'auto' is bf16 where it computes in bf16
    (GPUs, by default), float32 otherwise."""
    if setting == "auto":
        return torch.bfloat16 if compute == torch.bfloat16 \
            else torch.float32
    return MOMENTS_DTYPES[setting]


def build_optimizer(model: nn.Module, config: OptimizerConfig,
                    weights: Optional[ComputeWeights] = None,
                    compute: torch.dtype = torch.float32) -> FusedAdamW:
    """AdamW (``FusedAdamW``) that decays matrices and embeddings but not
    norm scales, and writes the compute weights' copies in its step when
    there are any; its moments as config says for a model computing in
    dtype compute (``moments_dtype``)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if decays(parameter) else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    settings = dict(lr=config.lr, betas=(config.adam_beta1,
                                         config.adam_beta2),
                    eps=config.adam_eps)
    return FusedAdamW(groups, weights,
                      moments_dtype(config.moments_dtype, compute),
                      **settings)


def clip_coefficient(norm: torch.Tensor, clip: float) -> torch.Tensor:
    """What gradients of norm are multiplied by to clip them to norm
    clip, as torch's clip_grads_with_norm_ computes it: clip / (norm +
    1e-6), at most 1; 1 when clip is 0 (never)."""
    if not clip:
        return torch.ones_like(norm)
    return torch.clamp(clip / (norm + 1e-6), max=1.0)


def _decay(fraction: float, style: str) -> float:
    """Multiplier going from 1 at fraction 0 to 0 at fraction 1."""
    fraction = min(max(fraction, 0.0), 1.0)
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * fraction))
    return 1.0 - fraction


def learning_rate(step: int, steps: int, optimizer: OptimizerConfig,
                  schedule: ScheduleConfig) -> float:
    """Learning rate of step (1-based) in a run of ``steps`` steps."""
    warmup = schedule.lr_warmup_iters
    if step <= warmup:
        return optimizer.lr * step / warmup
    style = schedule.lr_decay_style
    if style == "constant":
        return optimizer.lr
    if style == "wsd":
        decay_iters = schedule.lr_wsd_decay_iters
        if decay_iters is None:
            decay_iters = max(1, round(0.2 * steps))
        start = steps - decay_iters
        if step <= start:
            return optimizer.lr
        fraction = (step - start) / decay_iters
        decay_style = schedule.lr_wsd_decay_style
    else:
        fraction = (step - warmup) / max(1, steps - warmup)
        decay_style = style
    span = optimizer.lr - optimizer.min_lr
    return optimizer.min_lr + span * _decay(fraction, decay_style)


def mtp_loss_weight(step: int, steps: int,
                    schedule: ScheduleConfig) -> float:
    """Weight of the mean MTP loss at step: DeepSeek-V3's two stages."""
    if step <= schedule.mtp_loss_switch_fraction * steps:
        return schedule.mtp_loss_scaling_factor
    return schedule.mtp_loss_scaling_factor_final
