"""The fp8 section: which products run in FP8, and how."""
from dataclasses import dataclass
from typing import Literal

from coom.config.checks import require


@dataclass
class FP8Config:
    """FP8 matrix products after DeepSeek-V3's fine-grained recipe
    (``coom/fp8``). Master weights, gradients and optimizer states stay
    float32; embedding, output head, router, norms and attention keep
    their precision."""

    recipe: Literal["off", "blockwise", "rowwise", "tensorwise"] = "off"
    """Scaling of the FP8 operands: 'blockwise' is DeepSeek-V3's (1 x 128
    tiles for activations and gradients, 128 x 128 blocks for weights);
    'rowwise' one scale per row; 'tensorwise' one per tensor; 'off' keeps
    every product in train.precision."""

    emulate: bool = False
    """Run the recipe as exact quantise-dequantise in float32 instead of
    on FP8 matrix units: slow, but on any device (CPUs, GPUs older than
    compute capability 8.9), for checking numerics."""

    power_of_two_scales: bool = False
    """Round every scale up to a power of two, so scaling changes only
    exponents."""

    experts: bool = True
    """Run the routed experts' grouped products in FP8 too."""

    high_precision_first_layers: int = 0
    """Transformer blocks at the start of the stack that keep
    train.precision for all their products."""

    high_precision_last_layers: int = 0
    """Blocks at the end of the main stack (before the MTP modules) that
    keep train.precision."""

    def __post_init__(self):
        for name in ("high_precision_first_layers",
                     "high_precision_last_layers"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(self.recipe in ("off", "blockwise") or self.emulate
                or not self.experts, "experts",
                f"FP8 expert products run with recipe blockwise only (or "
                f"emulated); set fp8.experts=false for {self.recipe}")
