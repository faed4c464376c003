"""What a growth operator rewrites: one kind of per-parameter tensor of a
model, before and after growth.

A grown model carries three things across: its weights, and Adam's two
moments of each weight. An operator is written once, against
``Tensors``, and runs on each kind in turn:

- ``value``: the weights, and the persistent buffers (expert biases);
- ``first`` and ``second``: Adam's ``exp_avg`` and ``exp_avg_sq``.

``new`` starts as the grown model freshly initialised (random weights for
``value``, zeros for the moments) and the operator overwrites what it
carries from ``old``. The rule for the moments follows from that:

- an entry copied from an old entry keeps that entry's moments;
- an entry set to an old entry times c (``scaled``) has its first moment
  times c and its second times c squared, so Adam's next update of it is
  the old update times c;
- every other entry starts with zero moments, whatever its value (a
  fresh random weight, or a zero that keeps the function).
"""
from dataclasses import dataclass
from typing import Union

import torch

KINDS = ("value", "first", "second")


@dataclass
class Tensors:
    """One kind of tensor, by parameter name, before and after growth."""

    kind: str
    old: dict[str, torch.Tensor]
    new: dict[str, torch.Tensor]

    def scaled(self, tensor: torch.Tensor,
               factor: Union[float, torch.Tensor]) -> torch.Tensor:
        """tensor of an entry whose value is multiplied by factor."""
        return tensor * (factor ** 2 if self.kind == "second" else factor)

    def copy_prefix(self, source: str, target: str) -> None:
        """Every new tensor under ``target.`` set to the old one under
        ``source.`` (a module copied whole)."""
        for name in self.new:
            if name.startswith(target + "."):
                self.new[name] = self.old[source + name[len(target):]]
