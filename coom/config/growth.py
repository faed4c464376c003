"""The growth section: when and how the model grows during a run."""
from dataclasses import dataclass, field

from coom.config.checks import positive, require

GROWTH_OPERATORS = ("depth", "mtp", "width", "add_experts", "split_experts",
                    "upcycle")
"""The operators of ``coom.growth`` (docs/growth.md)."""


@dataclass
class GrowthStep:
    """One growth of the model during a run."""

    step: int = 0
    """The optimizer step after which the model grows."""

    op: str = ""
    """The growth operator: one of GROWTH_OPERATORS."""

    args: dict = field(default_factory=dict)
    """The operator's arguments, e.g. {num_layers: 8}."""

    def __post_init__(self):
        positive(self, "step")
        require(self.op in GROWTH_OPERATORS, "op",
                f"must be one of {', '.join(GROWTH_OPERATORS)}; got "
                f"{self.op!r}")


@dataclass
class GrowthConfig:
    """Progressive model expansion (``coom/growth``, ``docs/growth.md``):
    the model grows in flight, keeping what it computes."""

    schedule: list[GrowthStep] = field(default_factory=list)
    """Growths in step order; several at one step apply in list order.
    Each is a mapping {step, op, args}, e.g. {step: 100, op: depth, args:
    {num_layers: 8}}. The recipe's model section is the model before the
    first."""

    def __post_init__(self):
        steps = [entry.step for entry in self.schedule]
        require(steps == sorted(steps), "schedule",
                f"steps must not decrease; got {steps}")
