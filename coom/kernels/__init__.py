"""Fused Triton kernels, one file per op, each with a PyTorch reference.

Each op is a ``torch.library.triton_op`` with a registered backward (AdamW's
and the fused loss's are ``custom_op``: each runs once a step, and the
loss holds matmuls inductor would lower its own way). Eager calls on a
GPU launch the Triton kernels; ``torch.compile`` traces through the op,
so that inductor launches its kernels from the generated code, without
the Python op and Triton's launcher at every call (the step's GPU waited
on the host before each of them: ``docs/benchmarks.md``, session 26).
Each op's CPU kernel (``register_kernel("cpu")``) runs the reference,
also where the op is traced for the CPU or planned (``without_gpu``),
so that one op serves every device. Tests run the Triton kernels on the
CPU through Triton's interpreter (``TRITON_INTERPRET=1``) by disabling the
CPU kernel (``set_kernel_enabled``). Whether a model calls the ops at
all, or the plain references, is decided when it is built
(``fused_kernels``).
"""
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake


def without_gpu(x: torch.Tensor) -> bool:
    """Whether a ``triton_op`` of x is traced or planned without a GPU: x
    a fake CPU tensor (torch.compile tracing for the CPU) or a meta
    tensor (the planner's dry run). The op then runs as its plain
    PyTorch reference, since inductor launches Triton kernels only on
    GPUs. (Eager calls on the CPU run the op's CPU kernel, or with it
    disabled the Triton kernels in Triton's interpreter.)"""
    return x.device.type == "meta" or (x.device.type == "cpu"
                                       and is_fake(x))


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
