"""Which products FP8 makes faster, from a table measured on an H100.

FP8 halves a product's matrix time but adds its quantisations (of x and
x^T forward, of dy and dy^T backward). They cost about rows x (n + k)
bytes moved, the matrix time grows with rows x n x k, so FP8 gains only
where both sides are wide. On an H100 at COOM's presets the linears
2048 wide and up gain, and so do ``small``'s feed-forward products
(1536 <-> 4096); its other linears, and the routed experts of both
presets with their gating, run slower in FP8 than in bf16
(``MEASURED``). With ``fp8.filter`` on, a product converts only where
its measurement, or the nearest one to its shape, ran at least as fast
in FP8.

``MEASURED`` comes from ``benchmarks/fp8_shapes.py small medium`` on one
H100 SXM (2026-12-07, commit e33ca6d, ``docs/benchmarks.md``): each
product forward and backward in a CUDA graph, its quantisations
included and its weights' FP8 forms kept, as a step runs it. A linear's
rows are the micro-batch's tokens; the experts' rows are each expert's
at balanced routing, and their time is the gate-and-up and gated down
products together, which convert as one module. Measure other shapes
with the same script and add them here; for another GPU, replace the
table and ``MEASURED_ON``.
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
        return f"linear {self.k} -> {self.n} ({self.rows} rows)"


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
    _linear(16384, 1536, 1024, 0.265, 0.332),
    _linear(16384, 1536, 1536, 0.398, 0.464),
    _linear(16384, 1536, 4096, 1.017, 0.957),
    _linear(16384, 2304, 1536, 0.572, 0.709),
    _linear(16384, 3072, 512, 0.273, 0.367),
    _linear(16384, 4096, 1536, 0.965, 0.887),
    _experts(1536, 512, 1536, 3.757, 5.210),
    # medium: 8192 tokens a micro-batch, 16 experts of 2048, top 4
    _linear(8192, 2048, 4096, 0.650, 0.613),
    _linear(8192, 4096, 2048, 0.631, 0.584),
    _linear(8192, 4096, 4096, 1.261, 1.063),
    _linear(8192, 4096, 12288, 3.777, 2.984),
    _linear(8192, 6144, 4096, 1.898, 1.521),
    _linear(8192, 8192, 512, 0.335, 0.438),
    _linear(8192, 12288, 4096, 3.631, 2.855),
    _experts(2048, 2048, 4096, 9.418, 10.073),
)
"""H100 SXM, 2026-12-07; see the module's docstring."""

MEASURED_ON = "H100 SXM"
"""The GPU MEASURED was timed on, which the filter's choices assume."""


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
    """The measurement the filter went by; None where the filter did not
    decide (see reason)."""

    reason: str = ""
    """Why the filter did not decide: widths FP8 cannot take, or experts
    kept in FP8 for ``fp8.dispatch``; empty where the filter decided or
    is not in use (``fp8.filter=false``, emulation, recipes other than
    blockwise)."""

    def why(self) -> str:
        """The reason or the measurement, in words."""
        if self.evidence is None:
            return self.reason
        ratio = f"{self.evidence.speedup:.2f}x bf16's speed"
        if self.evidence.product == self.product:
            return f"measured FP8 at {ratio}"
        return f"nearest measurement, {self.evidence.product}: {ratio}"

    def record(self) -> dict:
        """The choice as the run records it (JSON)."""
        record = {"name": self.name, "kind": self.product.kind,
                  "rows": self.product.rows, "n": self.product.n,
                  "k": self.product.k, "fp8": self.fp8}
        if self.evidence is not None:
            record["measured"] = str(self.evidence.product)
            record["measured_speedup"] = round(self.evidence.speedup, 3)
        if self.reason:
            record["reason"] = self.reason
        return record


def describe(choices: list[Choice]) -> str:
    """The choices in a few lines for the start of a run: one per shape
    and verdict, those in FP8 first, each with one module's name."""
    shapes: dict[tuple, list[Choice]] = {}
    for choice in choices:
        product = choice.product
        key = (not choice.fp8, product.kind, product.n, product.k)
        shapes.setdefault(key, []).append(choice)
    converted = sum(choice.fp8 for choice in choices)
    lines = [f"FP8 products: {converted} of {len(choices)} in FP8, the "
             f"others in train.precision (table: {MEASURED_ON})"]
    for key in sorted(shapes, key=lambda key: (key[0], -len(shapes[key]))):
        same = shapes[key]
        first = same[0]
        verdict = "FP8" if first.fp8 else "kept"
        why = first.why()
        lines.append(f"  {verdict:4s} {len(same):3d} x {first.product}, "
                     f"e.g. {first.name}" + (f": {why}" if why else ""))
    if choices and not converted:
        lines.append("  No product gains from FP8 at these shapes, so the "
                     "run computes as without it; fp8.filter=false "
                     "converts them anyway.")
    return "\n".join(lines)
