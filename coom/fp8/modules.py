"""The FP8 replacements of COOM's layers, which ``coom.fp8.convert``
swaps in for the originals: the layers themselves know nothing of FP8.

Each replacement subclasses the layer it replaces and holds the very
Parameters (and child modules) of the original under the same names, so
that state dicts, checkpoints and optimizer state do not change.
"""
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

from coom.config import ModelConfig
from coom.fp8.dispatch import FP8Rows
from coom.fp8.grouped import (
    fp8_copies_grouped_linear,
    fp8_gated_grouped_linear,
    fp8_grouped_linear,
    grouped_weight_forms,
    quantises_copies,
)
from coom.fp8.linear import (
    FP8Linear,
    FP8Recipe,
    fp8_gated_linear,
    fp8_linears,
)
from coom.fp8.weights import KeptForms
from coom.kernels.swiglu import swiglu_reference
from coom.layers.mlp import SwiGLU
from coom.layers.moe import Copies, GroupedExperts

EXPERT_WEIGHTS = ("w1", "w3", "w2")
"""The routed experts' weights, in the order their products use them."""


def adopt(replacement: nn.Module, original: nn.Module) -> nn.Module:
    """replacement (built on the meta device), given original's own
    parameters and children under their names."""
    for name, parameter in original.named_parameters(recurse=False):
        setattr(replacement, name, parameter)
    for name, child in original.named_children():
        setattr(replacement, name, child)
    return replacement


class FP8SwiGLU(SwiGLU):
    """A SwiGLU whose w1 and w3 are FP8 linears of one recipe: their
    products share one FP8 copy of x, and an FP8 w2 takes the gating's
    output from the kernel that quantises it. That path reads their weights
    directly, past any hooks on w1 and w3: it relies on FP8 not running
    under tensor parallelism (refused by the config), whose hooks split
    them."""

    @classmethod
    def replacing(cls, swiglu: SwiGLU) -> "FP8SwiGLU":
        """The replacement of swiglu, whose w1 and w3 are FP8 linears."""
        with torch.device("meta"):
            replacement = cls(swiglu.w1.in_features, swiglu.w1.out_features,
                              swiglu.fused_kernels)
        return adopt(replacement, swiglu)

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor,
                                                    torch.Tensor]:
        forms = [self.w1.kept.forms(), self.w3.kept.forms()]
        return fp8_linears(x, [self.w1.weight, self.w3.weight],
                           self.w1.recipe, forms if all(forms) else ())

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """As SwiGLU's; with fused kernels and an FP8 w2, the gating is
        fused into the quantisation of its output
        (``fp8_gated_linear``)."""
        if not (self.fused_kernels and isinstance(self.w2, FP8Linear)):
            return super().feed_forward(x)
        gate, up = self.gate_and_up(x)
        return fp8_gated_linear(gate, up, self.w2.weight, self.w2.recipe,
                                self.w2.kept.forms())


class FP8GroupedExperts(GroupedExperts):
    """Grouped experts whose products run in FP8 (``coom.fp8.grouped``).

    Args:
        config: the model config.
        recipe: how the products run in FP8.
        fused_kernels: as GroupedExperts.
        transport: how the tokens travel to the experts in FP8
            (``coom.fp8.dispatch``), or None: as they are.
    """

    def __init__(self, config: ModelConfig, recipe: FP8Recipe,
                 fused_kernels: bool = True,
                 transport: Optional[FP8Rows] = None):
        super().__init__(config, fused_kernels)
        self.recipe = recipe
        self.transport = transport
        make = partial(grouped_weight_forms, recipe=recipe)
        self.kept = nn.ModuleDict({name: KeptForms(make)
                                   for name in EXPERT_WEIGHTS})

    @classmethod
    def replacing(cls, experts: GroupedExperts, recipe: FP8Recipe,
                  transport: Optional[FP8Rows] = None
                  ) -> "FP8GroupedExperts":
        """The replacement of experts, with recipe's products."""
        with torch.device("meta"):
            replacement = cls(experts.config, recipe, experts.fused_kernels,
                              transport)
        return adopt(replacement, experts)

    def refresh_kept(self) -> int:
        """Make the kept forms of the weights that changed again; the
        experts' weights may live elsewhere (expert parallelism), and
        then none are kept."""
        refreshed = 0
        for name, kept in self.kept.items():
            weight = self._parameters.get(name)
            if weight is None:
                kept.clear()
            else:
                refreshed += kept.refresh(weight)
        return refreshed

    def forward(self, x_cd: torch.Tensor | Copies, counts_e: torch.Tensor,
                beside: Optional[Callable[[], torch.Tensor]] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As GroupedExperts's, with the weights' kept FP8 forms; token
        ``Copies`` are quantised from their tokens, unmade
        (``fp8_copies_grouped_linear``), or with a transport first
        rounded as they would travel in FP8 (expert parallelism sends
        them so instead and calls ``run``, ``coom.parallel.expert``)."""
        # Copies not quantised from their tokens are made before beside
        # runs, as GroupedExperts makes them.
        if isinstance(x_cd, Copies) and (self.transport is not None or (
                not quantises_copies(x_cd, [self.w1, self.w3],
                                     self.recipe))):
            x_cd = x_cd.rows()
        if self.transport is not None:
            x_cd = self.transport.round(x_cd)
        besides = None if beside is None else beside()
        forms = tuple(kept.forms() for kept in self.kept.values())
        return self.recompute(self.compute, x_cd, counts_e, self.w1,
                              self.w3, self.w2, forms), besides

    def compute(self, x_cd: torch.Tensor | Copies, counts_e: torch.Tensor,
                w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                forms: tuple = ((), (), ())) -> torch.Tensor:
        """What run computes (of rows, or of token ``Copies``), with the
        weights' FP8 forms where given
        (``coom.fp8.grouped.grouped_weight_forms``, for w1, w3 and w2);
        with fused kernels, the gating is fused into the quantisation of
        its output (``fp8_gated_grouped_linear``)."""
        gate_and_up = fp8_copies_grouped_linear \
            if isinstance(x_cd, Copies) else fp8_grouped_linear
        gate, up = gate_and_up(x_cd, [w1, w3], counts_e, self.recipe,
                               forms[:2] if all(forms[:2]) else ())
        if self.fused_kernels:
            return fp8_gated_grouped_linear(gate, up, w2, counts_e,
                                            self.recipe, forms[2])
        (out,) = fp8_grouped_linear(swiglu_reference(gate, up), [w2],
                                    counts_e, self.recipe,
                                    forms[2:] if forms[2] else ())
        return out

    def extra_repr(self) -> str:
        if self.transport is None:
            return str(self.recipe)
        return f"{self.recipe}, tokens in FP8"


def fp8_copy(linear: nn.Linear, recipe: FP8Recipe) -> FP8Linear:
    """The FP8 replacement of a bias-free linear."""
    if linear.bias is not None:
        raise ValueError("FP8 linears have no bias")
    return adopt(FP8Linear(linear.in_features, linear.out_features, recipe,
                           device="meta"), linear)
