"""One AdamW step of a float32 tensor that also writes its bf16 copy, in
one pass.

Mixed precision keeps float32 master weights and computes with bf16
copies of them (``coom.parallel.precision``). A plain optimizer step
reads and writes the master, its gradient and moments; the copies would
then read every master once more. This kernel writes the copy from the
updated master it already holds: 30 bytes per parameter a step instead
of 28 + 6.

The step is torch.optim.AdamW's (decoupled weight decay, bias-corrected
moments), in float32, elementwise, of the gradient times grad_scale
(gradient clipping's coefficient, so that clipping needs no pass of its
own over the gradients):

    g <- g * grad_scale
    p <- p * (1 - lr * wd)
    m <- m + (1 - beta1) * (g - m)
    v <- beta2 * v + (1 - beta2) * g * g
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    copy <- p, rounded to the nearest bf16

Each program handles one contiguous block, each operation rounded on its
own (no fused multiply-adds: the scaled gradient is rounded before it
is used, as clipping in place rounds it). On the CPU the same formulas
run in plain PyTorch.

Tensor names end in their shape: n elements.
"""
import math

import torch
import triton
import triton.language as tl

from coom.kernels import bf16_nearest_even

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _step_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                 copy_ptr, numel, grad_scale, decay, beta1, beta2,
                 step_size, correction2_sqrt, eps, block: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * block + tl.arange(0, block)
    mask = offsets < numel
    p = tl.load(param_ptr + offsets, mask=mask)
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) * grad_scale
    m = tl.load(exp_avg_ptr + offsets, mask=mask)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p - step_size * (m / (tl.sqrt(v) / correction2_sqrt + eps))
    tl.store(param_ptr + offsets, p, mask=mask)
    tl.store(exp_avg_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
    tl.store(copy_ptr + offsets, bf16_nearest_even(p), mask=mask)


def _factors(lr: float, beta1: float, beta2: float, weight_decay: float,
             step: int) -> tuple[float, float, float]:
    """The weight's decay factor, the step size and sqrt(1 - beta2^t)."""
    return (1.0 - lr * weight_decay, lr / (1.0 - beta1 ** step),
            math.sqrt(1.0 - beta2 ** step))


@torch.library.custom_op(
    "coom::adamw_step",
    mutates_args=("param", "exp_avg", "exp_avg_sq", "copy"))
def adamw_step(param: torch.Tensor, grad: torch.Tensor,
               exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               copy: torch.Tensor, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int,
               grad_scale: float = 1.0) -> None:
    """AdamW's step t = step of param (float32, contiguous) with grad
    times grad_scale, moments exp_avg and exp_avg_sq, in place; copy
    (bf16, param's shape) then holds the new param, rounded to
    nearest."""
    if copy.dtype != torch.bfloat16:
        raise ValueError(f"adamw_step writes bf16 copies, not {copy.dtype}")
    numel = param.numel()
    if not numel:
        return
    decay, step_size, correction2_sqrt = _factors(lr, beta1, beta2,
                                                  weight_decay, step)
    _step_kernel[(triton.cdiv(numel, BLOCK),)](
        param, grad.contiguous(), exp_avg, exp_avg_sq, copy, numel,
        grad_scale, decay, beta1, beta2, step_size, correction2_sqrt, eps,
        block=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


@adamw_step.register_kernel("cpu")
def _(param, grad, exp_avg, exp_avg_sq, copy, lr, beta1, beta2, eps,
      weight_decay, step, grad_scale=1.0):
    adamw_step_reference(param, grad, exp_avg, exp_avg_sq, copy, lr, beta1,
                         beta2, eps, weight_decay, step, grad_scale)


def adamw_step_reference(param: torch.Tensor, grad: torch.Tensor,
                         exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         copy: torch.Tensor, lr: float, beta1: float,
                         beta2: float, eps: float, weight_decay: float,
                         step: int, grad_scale: float = 1.0) -> None:
    """The same step in plain PyTorch, as torch.optim.AdamW's
    single-tensor implementation orders it, of the gradient scaled as
    clipping scales it in place."""
    decay, step_size, correction2_sqrt = _factors(lr, beta1, beta2,
                                                  weight_decay, step)
    grad = grad.to(param.dtype) * grad_scale
    param.mul_(decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denominator = (exp_avg_sq.sqrt() / correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denominator, value=-step_size)
    copy.copy_(param)
