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

    filter: bool = True
    """Convert a product only where FP8 makes it faster, by a table of
    products measured forward and backward on an H100 (``coom.fp8.filter``;
    a shape the table lacks follows its nearest measurement). The choices
    are printed at the start and kept in the run's fp8_products.json.
    Applies to the blockwise recipe on FP8 units; false converts every
    product that fits, as emulation always does."""

    experts: bool = True
    """Run the routed experts' grouped products in FP8 too."""

    dispatch: bool = False
    """Send the routed experts their tokens in FP8, as DeepSeek-V3 does:
    each copy rounded to 1 x 128 tiles with float32 scales, the form the
    experts' FP8 products take. Under expert parallelism the all-to-all
    then moves about half of bf16's bytes; in one process the copies are
    rounded the same way, so layouts agree. Gradients return in
    train.precision. Needs the blockwise recipe with fp8.experts; the
    experts then run in FP8 whatever fp8.filter says, and those whose
    widths FP8 cannot take stay in train.precision, tokens too."""

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
        require(not self.dispatch or (self.recipe == "blockwise"
                                      and self.experts), "dispatch",
                "sends tokens in the blockwise recipe's tiles to FP8 "
                "experts; set fp8.recipe=blockwise and fp8.experts=true")
