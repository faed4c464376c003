"""Fused Triton kernels, one file per op, each with a PyTorch reference.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation
and a registered backward, so ``torch.compile`` traces through it. Layers
call an op's kernel when ``use_kernels(tensor)`` holds: by default on CUDA
tensors, never on CPU ones (there the reference runs; tests run the kernels
on CPU through Triton's interpreter, ``TRITON_INTERPRET=1``).
"""
import torch

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn the fused kernels on or off for every layer (train.kernels)."""
    global _enabled
    _enabled = enabled


def use_kernels(x: torch.Tensor) -> bool:
    """Whether layers should run their fused kernel on x."""
    return _enabled and x.is_cuda


def launcher(kernel, traceable: bool):
    """What launches a Triton kernel: the kernel itself, or where
    ``traceable`` its ``torch.library.wrap_triton`` wrapper, which
    ``torch.compile`` traces inside a ``triton_op`` (``coom.fp8.ops``;
    such an op's eager calls launch the kernel itself). Outside such an
    op, eager launches through the wrapper would go through a
    higher-order op's dispatch, about a millisecond each by torch's own
    account (``torch._library.triton.set_wrap_triton_enabled``)."""
    return torch.library.wrap_triton(kernel) if traceable else kernel
