"""Fused Triton kernels, one file per op, each with a PyTorch reference.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation
and a registered backward, so ``torch.compile`` traces through it. Its
default implementation launches the Triton kernel; its CPU kernel
(``register_kernel("cpu")``) runs the reference, so that one op serves
every device. Tests run the Triton kernels on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``) by disabling the CPU kernel
(``set_kernel_enabled``). Whether a model calls the ops at all, or the
plain references, is decided when it is built (``fused_kernels``).
"""
import torch
import triton
import triton.language as tl


def launcher(kernel, traceable: bool):
    """What launches a Triton kernel: the kernel itself, or where
    ``traceable`` its ``torch.library.wrap_triton`` wrapper, which
    ``torch.compile`` traces inside a ``triton_op`` (``coom.fp8.ops``;
    such an op's eager calls launch the kernel itself). Outside such an
    op, eager launches through the wrapper would go through a
    higher-order op's dispatch, about a millisecond each by torch's own
    account (``torch._library.triton.set_wrap_triton_enabled``)."""
    return torch.library.wrap_triton(kernel) if traceable else kernel


@triton.jit
def bf16_nearest_even(x):
    """float32 x rounded to the nearest bf16, ties to even, as torch
    rounds it, spelled out in its bits: Triton's interpreter truncates
    in its own conversion (NaN converts as it is)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)
