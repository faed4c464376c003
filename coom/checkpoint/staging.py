"""Where a background checkpoint copies its tensors before a thread
writes them (``BackgroundSave``): CPU buffers kept from one checkpoint
to the next, pinned on a GPU and filled by asynchronous copies.

Pinned memory copies several times faster than pageable memory: the
23 GB of ``small``'s weights and optimizer moments took 12.4 s into
pageable memory on an H100, 7.3 s through DCP's ``DefaultStager`` with
pinning, and 0.44 s into these buffers, the first checkpoint's included
(``benchmarks/checkpoint_stall.py``). DCP's ``DefaultStager`` cannot
keep its buffers on torch 2.11: it drops its cache after every save, and
its second save of a state dict holding Python objects fails (a torch
bug).
"""
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor


class KeptBuffers(AsyncStager):
    """Copies a state dict's tensors into CPU buffers keyed by their
    place in it (the keys and indices that lead to them), made at the
    first copy and reused; returns the state dict with those buffers in
    place of its tensors (DTensors keep their layout, around a CPU local
    tensor). The copy is complete when ``stage`` returns."""

    _synchronize_after_execute = False

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def stage(self, state_dict: dict) -> dict:
        staged = self._copy(state_dict, ())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return staged

    def _copy(self, value: Any, place: tuple) -> Any:
        if isinstance(value, DTensor):
            # Not DTensor.from_local, which would move the buffer back to
            # the mesh's device.
            return DTensor(self._fill(value.to_local(), place),
                           value._spec, requires_grad=False)
        if isinstance(value, torch.Tensor):
            return self._fill(value, place)
        if isinstance(value, dict):
            return {key: self._copy(item, (*place, key))
                    for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(item, (*place, index))
                               for index, item in enumerate(value))
        return value

    def _fill(self, tensor: torch.Tensor, place: tuple) -> torch.Tensor:
        buffer = self.buffers.get(place)
        if buffer is None or buffer.shape != tensor.shape \
                or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype,
                                 pin_memory=tensor.is_cuda
                                 and tensor.numel() > 0)
            self.buffers[place] = buffer
        return buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
