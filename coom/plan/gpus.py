"""The GPUs a plan can be made for: memory, and the peak rates that the
step-time roofline starts from.

Memory is what ``nvidia-smi`` reports as memory.total; the rates are
NVIDIA's dense (not sparse) datasheet figures for the SXM parts, and
link bandwidth is NVLink's per direction. H800 is H100 with NVLink cut
to 400 GB/s both ways, the GPU DeepSeek-V3 was trained on.
"""
from dataclasses import dataclass
from typing import Optional

from coom.errors import UserError

MIB = 2 ** 20


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int
    """Bytes."""

    bf16_flops: float
    fp8_flops: float
    memory_bandwidth: float
    """Bytes per second."""

    link_bandwidth: float
    """NVLink, bytes per second each way."""


GPUS = {gpu.name: gpu for gpu in (
    GPU("h100", 81559 * MIB, 989e12, 1979e12, 3.35e12, 450e9),
    GPU("h800", 81559 * MIB, 989e12, 1979e12, 3.35e12, 200e9),
    GPU("h200", 143771 * MIB, 989e12, 1979e12, 4.8e12, 450e9),
    GPU("a100", 81920 * MIB, 312e12, 0.0, 2.04e12, 300e9),
)}


def gpu_named(name: str) -> GPU:
    """The GPU of GPUS called name (any case)."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise UserError(f"unknown GPU {name!r}; the planner knows "
                        f"{', '.join(GPUS)}") from None


def kind_of(device_name: str) -> Optional[str]:
    """The name in GPUS of the GPU torch calls device_name, if any."""
    found = device_name.lower()
    return next((name for name in GPUS if name in found), None)
