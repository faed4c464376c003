"""The energy counters one process reads, by source: ``gpu`` and ``cpu``.

A process meters the GPU it trains on. The CPU packages belong to the
machine, so only its first process (node-local rank 0 under torchrun)
reads them, and a sum over all processes counts each machine once.
"""
from pathlib import Path

import torch
import torch.distributed as dist

from coom.energy.counter import NoMeterError, WrappingCounter
from coom.energy.nvml import gpu_energy_counter
from coom.energy.rapl import POWERCAP, package_counters

SOURCES = ("gpu", "cpu")
LABELS = {"gpu": "GPUs (NVML)", "cpu": "CPU packages (RAPL)"}


class EnergyMeter:
    """Joules per source since the meter was made.

    Args:
        counters: each metered source's counters (CPU: one per package).
        reasons: why each source without counters is not metered.
        machine_leader: whether this process meters its machine's CPU
            packages.
    """

    def __init__(self, counters: dict[str, list[WrappingCounter]],
                 reasons: dict[str, str], machine_leader: bool):
        self.counters = counters
        self.reasons = reasons
        self.machine_leader = machine_leader

    @property
    def metered(self) -> tuple[str, ...]:
        return tuple(source for source in SOURCES if self.counters.get(
            source))

    def read(self) -> dict[str, float]:
        """Joules of each metered source since the meter was made."""
        return {source: sum(counter.joules() for counter in counters)
                for source, counters in self.counters.items() if counters}


def first_on_machine() -> bool:
    """Whether this process is its machine's first (or alone)."""
    return dist.get_node_local_rank(fallback_rank=0) == 0


def open_meter(device: torch.device, machine_leader: bool,
               powercap: Path = POWERCAP) -> EnergyMeter:
    """The meter of a process training on device: its GPU's counter, and
    the CPU packages' if machine_leader; sources that cannot be read are
    left out with the reason."""
    counters, reasons = {}, {}
    try:
        counters["gpu"] = [gpu_energy_counter(device)]
    except NoMeterError as error:
        reasons["gpu"] = str(error)
    if machine_leader:
        packages = package_counters(powercap)
        if packages:
            counters["cpu"] = packages
        else:
            reasons["cpu"] = "no readable RAPL counter"
    return EnergyMeter(counters, reasons, machine_leader)
