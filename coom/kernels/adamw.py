"""One AdamW step of float32 tensors, in one pass and one launch, that
also writes their bf16 compute copies where there are any.

Mixed precision keeps float32 master weights and computes with bf16
copies of them (``coom.parallel.precision``). A plain optimizer step
reads and writes the master, its gradient and moments; the copies would
then read every master once more. This kernel writes the copy from the
updated master it already holds: 30 bytes per parameter a step instead
of 28 + 6 (28 with the copies' own bf16 gradients; 8 fewer with
DeepSeek-V3's bf16 moments, ``optimizer.moments_dtype``).

The step is torch.optim.AdamW's (decoupled weight decay, bias-corrected
moments), in float32, elementwise, of the gradient times grad_scale
(gradient clipping's coefficient, so that clipping needs no pass of its
own over the gradients). Both the scale and whether the step applies at
all are read on the device, so the caller can launch the step before
it knows them on the host (``coom.train.trainer``: a step whose loss or
gradient norm is not finite leaves everything as it was):

    g <- g * grad_scale
    p <- p * (1 - lr * wd)
    m <- m + (1 - beta1) * (g - m)
    v <- beta2 * v + (1 - beta2) * g * g
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    copy <- p, rounded to the nearest bf16

One launch steps a list of tensors, as torch's fused AdamW does: a
model's hundreds of parameters would otherwise cost a launch and an
op's dispatch each, which on the host take longer than the step takes
on the GPU. Each program handles one block of one tensor: a table of the
tensors' addresses (made every call, since gradients move) and one of
each block's tensor (kept while the sizes stay the same) say which.
Each operation is rounded on its own (no fused multiply-adds: the scaled
gradient is rounded before it is used, as clipping in place rounds it).
On the CPU the same formulas run in plain PyTorch.

Tensor names end in their shape: n elements, t tensors, b blocks.
"""
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from coom.kernels import bf16_nearest_even

# Chosen by benchmarks/adamw.py on an H100 (docs/benchmarks.md, session
# 26): a step of small's parameters took 17.97 ms (3.01 TB/s) at 2048
# elements and 16 warps a program, 20.79 ms at 4096 and 8.
BLOCK = 2048
NUM_WARPS = 16


@triton.jit
def _update(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, copy_ptrs,
            mask, grad_scale, decay, beta1, beta2, step_size,
            correction2_sqrt, eps, bf16_moments: tl.constexpr,
            write_copies: tl.constexpr):
    """The step of the block at the pointers (mask None: a whole
    block)."""
    p = tl.load(param_ptrs, mask=mask)
    g = tl.load(grad_ptrs, mask=mask).to(tl.float32) * grad_scale
    m = tl.load(exp_avg_ptrs, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq_ptrs, mask=mask).to(tl.float32)
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p - step_size * (m / (tl.sqrt(v) / correction2_sqrt + eps))
    tl.store(param_ptrs, p, mask=mask)
    if bf16_moments:
        m = bf16_nearest_even(m)
        v = bf16_nearest_even(v)
    tl.store(exp_avg_ptrs, m, mask=mask)
    tl.store(exp_avg_sq_ptrs, v, mask=mask)
    if write_copies:
        tl.store(copy_ptrs, bf16_nearest_even(p), mask=mask)


@triton.jit
def _address(row, operand, tensors, dtype: tl.constexpr,
             aligned: tl.constexpr):
    """An operand's address from the table, as a pointer to dtype; where
    aligned (``adamw_step`` checks), one the compiler knows to be 16-byte
    aligned, so that whole blocks load and store in 16-byte vectors."""
    address = tl.load(row + operand * tensors).to(tl.pointer_type(dtype))
    if aligned:
        address = tl.multiple_of(address, 16)
    return address


@triton.jit
def _step_kernel(addresses_ptr, numels_ptr, block_tensor_ptr,
                 first_block_ptr, tensors, grad_scale_ptr, applies_ptr,
                 decay, beta1, beta2, step_size, correction2_sqrt, eps,
                 bf16_grads: tl.constexpr, bf16_moments: tl.constexpr,
                 write_copies: tl.constexpr, aligned: tl.constexpr,
                 block: tl.constexpr):
    if tl.load(applies_ptr) == 0:
        return
    grad_scale = tl.load(grad_scale_ptr)
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + pid)
    start = (pid - tl.load(first_block_ptr + tensor)).to(tl.int64) * block
    offsets = start + tl.arange(0, block)
    numel = tl.load(numels_ptr + tensor)
    row = addresses_ptr + tensor
    grad = tl.bfloat16 if bf16_grads else tl.float32
    moment = tl.bfloat16 if bf16_moments else tl.float32
    param_ptrs = _address(row, 0, tensors, tl.float32, aligned) + offsets
    grad_ptrs = _address(row, 1, tensors, grad, aligned) + offsets
    exp_avg_ptrs = _address(row, 2, tensors, moment, aligned) + offsets
    exp_avg_sq_ptrs = _address(row, 3, tensors, moment, aligned) + offsets
    copy_ptrs = _address(row, 4, tensors, tl.bfloat16, aligned) + offsets
    # Only a tensor's last block needs a mask, which a size the compiler
    # cannot know would make element by element.
    if start + block <= numel:
        _update(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs,
                copy_ptrs, None, grad_scale, decay, beta1, beta2,
                step_size, correction2_sqrt, eps, bf16_moments,
                write_copies)
    else:
        _update(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs,
                copy_ptrs, offsets < numel, grad_scale, decay, beta1,
                beta2, step_size, correction2_sqrt, eps, bf16_moments,
                write_copies)


def _factors(lr: float, beta1: float, beta2: float, weight_decay: float,
             step: int) -> tuple[float, float, float]:
    """The weight's decay factor, the step size and sqrt(1 - beta2^t)."""
    return (1.0 - lr * weight_decay, lr / (1.0 - beta1 ** step),
            math.sqrt(1.0 - beta2 ** step))


@functools.lru_cache(maxsize=8)
def _blocks(numels: tuple[int, ...], device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensors' sizes (t), each block's tensor (b) and each tensor's
    first block (t), on device, for tensors of numels elements."""
    counts = [triton.cdiv(numel, BLOCK) for numel in numels]
    block_tensor_b = torch.repeat_interleave(
        torch.arange(len(numels), dtype=torch.int32),
        torch.tensor(counts))
    first_block_t = torch.tensor([0, *counts[:-1]]).cumsum(0)
    return (torch.tensor(numels, dtype=torch.int64).to(device),
            block_tensor_b.to(device), first_block_t.to(device))


DTYPES = ({torch.float32}, {torch.float32, torch.bfloat16},
          {torch.float32, torch.bfloat16}, {torch.float32, torch.bfloat16},
          {torch.bfloat16})
"""What each operand may be: parameters, gradients, both moments,
copies."""


def _check(operands: list[list[torch.Tensor]]) -> bool:
    """Operands the kernel can read: each of its dtypes (``DTYPES``), one
    dtype for all gradients and one for all moments, contiguous, on the
    parameters' device, and as large as their parameters. Returns
    whether every one that holds elements is 16-byte aligned."""
    params = operands[0]
    if operands[4] and len(operands[4]) != len(params):
        raise ValueError("adamw_step writes a copy of every parameter or "
                         "none")
    for allowed, tensors in zip(DTYPES, operands):
        if not {tensor.dtype for tensor in tensors} <= allowed:
            raise ValueError(f"adamw_step takes {sorted(map(str, allowed))}"
                             f", not {tensors[0].dtype}")
        for tensor, param in zip(tensors, params):
            if not tensor.is_contiguous() or tensor.device != param.device \
                    or tensor.numel() != param.numel():
                raise ValueError("adamw_step takes contiguous operands of "
                                 "their parameters' size and device")
    for name, tensors in (("gradients", operands[1]),
                          ("moments", operands[2] + operands[3])):
        if len({tensor.dtype for tensor in tensors}) > 1:
            raise ValueError(f"adamw_step takes {name} of one dtype")
    return not any(tensor.data_ptr() % 16 for tensors in operands
                   for tensor in tensors if tensor.numel())


def _addresses(operands: list[list[torch.Tensor]],
               device: torch.device) -> torch.Tensor:
    """The operands' addresses on device, (5, t) int64 (parameters,
    gradients, both moments, copies), copied from pinned memory without
    waiting for the device."""
    addresses = torch.tensor([[tensor.data_ptr() for tensor in tensors]
                              for tensors in operands], dtype=torch.int64)
    if device.type == "cuda":
        addresses = addresses.pin_memory()
    return addresses.to(device, non_blocking=True)


@torch.library.custom_op(
    "coom::adamw_step",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "copies"))
def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor],
               exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
               copies: list[torch.Tensor], lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, step: int,
               grad_scale: Optional[torch.Tensor] = None,
               applies: Optional[torch.Tensor] = None) -> None:
    """AdamW's step t = step of params (float32, contiguous) with grads
    (all float32 or all bf16) times grad_scale, moments exp_avgs and
    exp_avg_sqs (all float32 or all bf16, which the step computes in
    float32 and stores rounded to nearest), in place, in one launch;
    copies (bf16, the params' shapes; or none) then hold the new params,
    rounded to nearest. grad_scale (float32) and applies (bool) are
    tensors of one element on the params' device, by default 1 and
    true; where applies is false, nothing changes."""
    if not params:
        return
    grads = [grad.contiguous() for grad in grads]
    operands = [params, grads, exp_avgs, exp_avg_sqs, copies]
    aligned = _check(operands)
    device = params[0].device
    grad_scale, applies = _on_device(grad_scale, applies, device)
    numels_t, block_tensor_b, first_block_t = _blocks(
        tuple(param.numel() for param in params), device)
    # Without copies the kernel writes none: the parameters stand in.
    addresses = _addresses([*operands[:4], copies or params], device)
    decay, step_size, correction2_sqrt = _factors(lr, beta1, beta2,
                                                  weight_decay, step)
    _step_kernel[(block_tensor_b.numel(),)](
        addresses, numels_t, block_tensor_b, first_block_t, len(params),
        grad_scale, applies, decay, beta1, beta2, step_size,
        correction2_sqrt, eps,
        bf16_grads=grads[0].dtype == torch.bfloat16,
        bf16_moments=exp_avgs[0].dtype == torch.bfloat16,
        write_copies=bool(copies),
        aligned=aligned, block=BLOCK, num_warps=NUM_WARPS,
        enable_fp_fusion=False)


def _on_device(grad_scale: Optional[torch.Tensor],
               applies: Optional[torch.Tensor], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's scale and whether it applies, as the kernel reads them:
    one element each, on device (by default 1 and true)."""
    if grad_scale is None:
        grad_scale = torch.ones((), device=device)
    if applies is None:
        applies = torch.ones((), dtype=torch.bool, device=device)
    for tensor, dtype in ((grad_scale, torch.float32),
                          (applies, torch.bool)):
        if tensor.numel() != 1 or tensor.dtype != dtype \
                or tensor.device != device:
            raise ValueError(f"adamw_step takes one {dtype} element on "
                             f"{device}, not {tensor.dtype} "
                             f"{tuple(tensor.shape)} on {tensor.device}")
    return grad_scale, applies


@adamw_step.register_kernel("cpu")
def _(params, grads, exp_avgs, exp_avg_sqs, copies, lr, beta1, beta2, eps,
      weight_decay, step, grad_scale=None, applies=None):
    if not params:
        return
    grad_scale, applies = _on_device(grad_scale, applies, params[0].device)
    if not applies:
        return
    for index, operands in enumerate(zip(params, grads, exp_avgs,
                                         exp_avg_sqs)):
        adamw_step_reference(*operands, copies[index] if copies else None,
                             lr, beta1, beta2, eps, weight_decay, step,
                             grad_scale.item())


def adamw_step_reference(param: torch.Tensor, grad: torch.Tensor,
                         exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         copy: Optional[torch.Tensor], lr: float,
                         beta1: float, beta2: float, eps: float,
                         weight_decay: float, step: int,
                         grad_scale: float = 1.0) -> None:
    """The same step in plain PyTorch, as torch.optim.AdamW's
    single-tensor implementation orders it, of the gradient scaled as
    clipping scales it in place; bf16 moments step in float32 and are
    stored rounded."""
    decay, step_size, correction2_sqrt = _factors(lr, beta1, beta2,
                                                  weight_decay, step)
    grad = grad.to(param.dtype) * grad_scale
    first, second = exp_avg.to(param.dtype), exp_avg_sq.to(param.dtype)
    param.mul_(decay)
    first.lerp_(grad, 1.0 - beta1)
    second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denominator = (second.sqrt() / correction2_sqrt).add_(eps)
    param.addcdiv_(first, denominator, value=-step_size)
    exp_avg.copy_(first)
    exp_avg_sq.copy_(second)
    if copy is not None:
        copy.copy_(param)
