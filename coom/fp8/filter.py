"""Which products FP8 makes faster, from a table measured on an H100.

FP8 halves a product's matrix time but adds its quantisations (of x and
x^T forward, of dy and dy^T backward), which grow with the rows and the
product's narrower side while the matrix time grows with both sides. So
narrow products lose: on an H100 at COOM's presets, linears narrower
than about 2048 a side and the routed experts of 512 to 2048 wide run
slower in FP8 than in bf16 (``MEASURED``). With ``fp8.filter`` on, a
product converts only where its measurement, or the nearest one to its
shape, ran at least as fast in FP8.

``MEASURED`` comes from ``benchmarks/fp8_shapes.py small medium`` on one
H100 SXM (2026-12-07, commit 168e698, ``docs/benchmarks.md``): each
product forward and backward in a CUDA graph, its quantisations
included and its weights' FP8 forms kept, as a step runs it. A linear's
rows are the micro-batch's tokens; the experts' rows are each expert's
at balanced routing, and their time is the gate-and-up and gated down
products together, which convert as one module. Measure other shapes
with the same script and add them here.
"""
import math
from dataclasses import dataclass
from typing import Literal, Optional

Kind = Literal["linear", "experts"]


@dataclass(frozen=True)
class Product:
    """One product's shape: y (rows, n) = x (rows, k) W^T; for routed
    experts, each expert's rows, n their width and k the hidden size."""

    kind: Kind
    rows: int
    n: int
    k: int

    def __str__(self) -> str:
        if self.kind == "experts":
            return f"experts {self.k} -> {self.n} ({self.rows} rows each)"
        return f"linear {self.n} x {self.k} ({self.rows} rows)"


@dataclass(frozen=True)
class Timing:
    """A product's measured forward-and-backward time in bf16 and FP8."""

    product: Product
    bf16_ms: float
    fp8_ms: float

    @property
    def speedup(self) -> float:
        return self.bf16_ms / self.fp8_ms


def _linear(rows: int, n: int, k: int, bf16_ms: float,
            fp8_ms: float) -> Timing:
    return Timing(Product("linear", rows, n, k), bf16_ms, fp8_ms)


def _experts(rows: int, n: int, k: int, bf16_ms: float,
             fp8_ms: float) -> Timing:
    return Timing(Product("experts", rows, n, k), bf16_ms, fp8_ms)


MEASURED = (
    # small: 16384 tokens a micro-batch, 64 experts of 512, top 6
    _linear(16384, 1024, 1536, 0.277, 0.362),
    _linear(16384, 1536, 1024, 0.266, 0.332),
    _linear(16384, 1536, 1536, 0.396, 0.466),
    _linear(16384, 1536, 4096, 1.017, 0.955),
    _linear(16384, 2304, 1536, 0.573, 0.707),
    _linear(16384, 3072, 512, 0.268, 0.382),
    _linear(16384, 4096, 1536, 0.956, 0.900),
    _experts(1536, 512, 1536, 3.777, 5.601),
    # medium: 8192 tokens a micro-batch, 16 experts of 2048, top 4
    _linear(8192, 2048, 4096, 0.659, 0.626),
    _linear(8192, 4096, 2048, 0.606, 0.587),
    _linear(8192, 4096, 4096, 1.269, 1.050),
    _linear(8192, 4096, 12288, 3.846, 3.027),
    _linear(8192, 6144, 4096, 1.924, 1.542),
    _linear(8192, 8192, 512, 0.337, 0.428),
    _linear(8192, 12288, 4096, 3.583, 2.856),
    _experts(2048, 2048, 4096, 9.376, 10.830),
)
"""H100 SXM, 2026-12-07; see the module's docstring."""


def _distance(a: Product, b: Product) -> float:
    """How far apart two shapes are: the sum of their sides' log
    ratios, so that doubling any side counts the same."""
    return sum(abs(math.log2(x / y))
               for x, y in ((a.rows, b.rows), (a.n, b.n), (a.k, b.k)))


def nearest(product: Product,
            measured: tuple[Timing, ...] = MEASURED) -> Timing:
    """The measurement of product's kind nearest its shape."""
    return min((timing for timing in measured
                if timing.product.kind == product.kind),
               key=lambda timing: _distance(timing.product, product))


@dataclass(frozen=True)
class Choice:
    """What ``coom.fp8.convert`` did with one product."""

    name: str
    """The module's name in the model."""

    product: Product
    fp8: bool
    """Whether it runs in FP8."""

    evidence: Optional[Timing] = None
    """The measurement the filter went by; None where it did not
    decide (filter off, emulation, or widths FP8 cannot take)."""

    def record(self) -> dict:
        """The choice as the run records it (JSON)."""
        record = {"name": self.name, "kind": self.product.kind,
                  "rows": self.product.rows, "n": self.product.n,
                  "k": self.product.k, "fp8": self.fp8}
        if self.evidence is not None:
            record["measured"] = str(self.evidence.product)
            record["measured_speedup"] = round(self.evidence.speedup, 3)
        return record


def describe(choices: list[Choice]) -> str:
    """The choices in a few lines, one per shape, for the start of a
    run."""
    shapes: dict[tuple, list[Choice]] = {}
    for choice in choices:
        key = (choice.product.kind, choice.product.n, choice.product.k,
               choice.fp8)
        shapes.setdefault(key, []).append(choice)
    lines = [f"FP8 products: {sum(c.fp8 for c in choices)} of "
             f"{len(choices)} in FP8"]
    for same in shapes.values():
        first = same[0]
        if first.evidence is not None:
            why = f": measured {first.evidence.speedup:.2f}x"
            if first.evidence.product != first.product:
                why += f" at {first.evidence.product}"
        else:
            why = "" if first.fp8 else ": widths FP8 cannot take"
        verdict = "FP8" if first.fp8 else "off"
        lines.append(f"  {verdict:3s} {len(same):3d} x {first.product}{why}")
    return "\n".join(lines)
