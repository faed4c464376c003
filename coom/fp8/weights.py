"""FP8 weights quantised once per optimizer step, not once per
micro-batch.

A weight is the right operand of two of its layer's three FP8 products
(y = x W^T and dx = dy W), so each forward quantised it, and its W^T,
again, although it changes only when the optimizer steps. Each FP8 layer
now keeps its weights' FP8 forms (``KeptForms``) and takes them in its
products. ``refresh`` makes them again for the weights that changed
since (the same tensor at another version, as the version counter says
for the compute copies in ``coom.parallel.precision``, or another
tensor); the built model calls it at the
start of each step's forwards and of each evaluation, outside compiled
code (``coom.parallel.model``). The forms are those the products would
make, bit for bit.

Weights that are sharded outside their forward (FSDP's DTensors) and
experts whose weights arrive per forward (expert parallelism) keep no
forms: their products quantise them as before.
"""
import weakref
from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class KeptForms(nn.Module):
    """The FP8 forms of one weight, kept between its changes as
    non-persistent buffers (no checkpoint holds them).

    Args:
        make: the forms of a weight (``coom.fp8.linear.weight_forms`` and
            its emulated and grouped counterparts, for one recipe).
    """

    def __init__(self, make: Callable[[torch.Tensor],
                                      tuple[torch.Tensor, ...]]):
        super().__init__()
        self.make = make
        self.count = 0
        self.source: Optional[tuple[weakref.ref, int]] = None
        """The weight and its version the forms were made of."""

    def forms(self) -> tuple[torch.Tensor, ...]:
        """The kept forms; none before the first refresh."""
        return tuple(getattr(self, f"form_{index}")
                     for index in range(self.count))

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> bool:
        """Make the forms of weight again if it changed since they were
        made; whether it did. A weight sharded outside the forward keeps
        none. (On the meta device, where the planner counts what a GPU
        holds, the forms are made once.)"""
        if isinstance(weight, DTensor):
            self.clear()
            return False
        if self.source is not None and self.source[0]() is weight \
                and self.source[1] == weight._version:
            return False
        for index, form in enumerate(self.make(weight)):
            self.register_buffer(f"form_{index}", form, persistent=False)
            self.count = index + 1
        self.source = weakref.ref(weight), weight._version
        return True

    def clear(self) -> None:
        """Keep no forms."""
        for index in range(self.count):
            delattr(self, f"form_{index}")
        self.count, self.source = 0, None


def refresh(model: nn.Module) -> int:
    """Make again the kept FP8 forms of model's weights that changed;
    how many were made."""
    return sum(module.refresh_kept() for module in model.modules()
               if hasattr(module, "refresh_kept"))
