"""The rates a GPU reaches, by kind of work, for the step-time roofline.

A table per GPU kind: FLOP/s of matrix products, grouped (expert)
products and attention, bytes/s of memory-bound work, and the least time
a kernel takes (its launch). ``coom plan --calibrate`` measures them on
the GPU it runs on (``coom.plan.calibrate``) and writes them to
``calibrated_path(gpu)``, which plans then read. Without one, a plan
uses the H100 figures below, measured by COOM's benchmarks on an H100
(``docs/benchmarks.md``: a 8192^3 bf16 product at 788 TFLOP/s, a copy at
2.96 TB/s), and for other GPUs the same fractions of their datasheet.
"""
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from coom.plan.gpus import GPU

H100_FRACTIONS = {"matmul": 788e12 / 989e12, "grouped matmul": 0.6,
                  "attention": 0.45, "fp8 matmul": 0.6,
                  "fp8 grouped matmul": 0.45}
COPY_FRACTION = 2.96e12 / 3.35e12
LAUNCH_SECONDS = 5e-6


@dataclass(frozen=True)
class Ceilings:
    """Rates by kind of work: FLOP/s, and bytes/s for "memory"."""

    gpu: str
    rates: dict
    launch: float
    source: str

    def seconds(self, kind: str, flops: int, moved: int) -> float:
        """The time of one kernel: its work at its kind's rate (bytes
        moved at copy speed for memory-bound work), at least a launch."""
        if kind == "memory" or not flops:
            work = moved / self.rates["memory"]
        else:
            work = flops / self.rates[kind]
        return max(work, self.launch)


def calibrated_path(gpu: str) -> Path:
    """Where ``coom plan --calibrate`` keeps gpu's table."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "coom" / f"ceilings-{gpu}.json"


def ceilings_for(gpu: GPU) -> Ceilings:
    """gpu's calibrated table if there is one, else its datasheet at the
    H100's measured fractions (which also fill in kinds a calibration
    left out)."""
    rates = {kind: fraction * (gpu.fp8_flops if "fp8" in kind
                               else gpu.bf16_flops)
             for kind, fraction in H100_FRACTIONS.items()}
    rates["memory"] = COPY_FRACTION * gpu.memory_bandwidth
    path = calibrated_path(gpu.name)
    if not path.is_file():
        return Ceilings(gpu.name, rates, LAUNCH_SECONDS,
                        "datasheet at the H100's measured fractions")
    measured = json.loads(path.read_text())
    # Kinds the calibration did not measure keep the datasheet's.
    measured["rates"] = rates | measured["rates"]
    return Ceilings(**measured)


def save(ceilings: Ceilings) -> Path:
    path = calibrated_path(ceilings.gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(ceilings), indent=1) + "\n")
    return path
