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
from coom.errors import UserError
from coom.kernels.adamw import adamw_step
from coom.models.info import decays
from coom.parallel.precision import ComputeWeights

MOMENTS_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


class CopyWritingAdamW(torch.optim.AdamW):
    """torch's AdamW, whose step also writes each parameter's compute
    copy (``coom.parallel.precision.ComputeWeights``) in the same pass
    (``coom.kernels.adamw``), so the next step needs no cast of the
    masters. It reads each gradient where the compute weights hold it
    (the copies keep bf16 ones in a step of one micro-batch). Its state
    is torch's, so checkpoints of either load into the other.

    Args:
        groups: the parameter groups.
        weights: the compute weights whose copies the step writes.
        moments_dtype: the moments' dtype, float32 or bf16.
        settings: AdamW's lr, betas, eps.
    """

    def __init__(self, groups: list[dict], weights: ComputeWeights,
                 moments_dtype: torch.dtype = torch.float32, **settings):
        super().__init__(groups, **settings)
        self.weights = weights
        self.moments_dtype = moments_dtype
        # torch's load_state_dict casts every state tensor to its
        # parameter's dtype.
        self.register_load_state_dict_post_hook(_moments_as_configured)

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float = 1.0):
        """The step of the gradients times grad_scale (clipping's
        coefficient, ``clip_coefficient``), which stay as they are: one
        launch for each group's tensors of one step count and gradient
        dtype."""
        if closure is not None:
            raise ValueError("CopyWritingAdamW takes no closure")
        written = []
        for group in self.param_groups:
            batches = collections.defaultdict(list)
            for parameter in group["params"]:
                grad = self.weights.gradient(parameter)
                if grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for name in ("exp_avg", "exp_avg_sq"):
                        state[name] = torch.zeros_like(
                            parameter, dtype=self.moments_dtype)
                # A checkpoint of the fused AdamW keeps the step on the
                # device; the host needs it for the bias corrections.
                state["step"] = state["step"].cpu() + 1
                batches[int(state["step"]), grad.dtype].append(
                    (parameter, grad, state))
            for (step, _), members in batches.items():
                parameters = [member[0] for member in members]
                adamw_step(parameters, [member[1] for member in members],
                           [member[2]["exp_avg"] for member in members],
                           [member[2]["exp_avg_sq"] for member in members],
                           [self.weights.masters[p] for p in parameters],
                           group["lr"], *group["betas"], group["eps"],
                           group["weight_decay"], step, grad_scale)
                written += parameters
        # Only the copies it wrote: one without a gradient keeps its
        # version, and is cast again if its master changes.
        self.weights.made_fresh(written)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients, the masters' and those the copies keep
        (``ComputeWeights.keep_gradients``)."""
        super().zero_grad(set_to_none)
        self.weights.clear_gradients()


def _moments_as_configured(optimizer: CopyWritingAdamW) -> None:
    """Cast optimizer's loaded moments back to its moments' dtype."""
    for state in optimizer.state.values():
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name] = state[name].to(optimizer.moments_dtype)


def check_moments(moments_dtype: str,
                  weights: Optional[ComputeWeights]) -> None:
    """Refuse moments in moments_dtype (``optimizer.moments_dtype``)
    other than float32 where torch's AdamW would step: without compute
    weights to write (``CopyWritingAdamW``)."""
    if moments_dtype != "float32" and weights is None:
        raise UserError(
            f"optimizer.moments_dtype={moments_dtype} needs the "
            "AdamW that writes bf16 compute copies: train.precision bf16 "
            "(or auto on a GPU) in one process or under pipeline "
            "parallelism alone; in other layouts torch's AdamW steps "
            "float32 moments")


def build_optimizer(model: nn.Module, config: OptimizerConfig,
                    weights: Optional[ComputeWeights] = None
                    ) -> torch.optim.AdamW:
    """AdamW that decays matrices and embeddings but not norm scales: one
    that writes the compute weights' copies in its step when there are
    any; else the fused implementation on GPUs, the multi-tensor
    (foreach) one on CPUs: both take a group's tensors in one call, so
    CPU tests see what GPUs do (a group must not mix DTensors and plain
    tensors)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if decays(parameter) else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    settings = dict(lr=config.lr, betas=(config.adam_beta1,
                                         config.adam_beta2),
                    eps=config.adam_eps)
    check_moments(config.moments_dtype, weights)
    if weights is not None:
        return CopyWritingAdamW(groups, weights,
                                MOMENTS_DTYPES[config.moments_dtype],
                                **settings)
    on_gpu = any(parameter.is_cuda for parameter in decay)
    return torch.optim.AdamW(groups, **settings, fused=on_gpu or None,
                             foreach=None if on_gpu else True)


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
