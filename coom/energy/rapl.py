"""CPU package energy from Linux's RAPL powercap interface.

Each CPU package (socket) is a zone ``/sys/class/powercap/intel-rapl:N``
named ``package-N``, AMD's Zen packages included. Its ``energy_uj`` counts
microjoules up to ``max_energy_range_uj`` and wraps. Subzones
(``intel-rapl:N:M``: cores, uncore, DRAM) and platform zones (``psys``)
are skipped, so nothing is counted twice. Since Linux 5.10 ``energy_uj``
is readable by root only; then there is no CPU meter, and the run says
so.
"""
from functools import partial
from pathlib import Path

from coom.energy.counter import WrappingCounter

POWERCAP = Path("/sys/class/powercap")


def _microjoules(path: Path) -> int:
    return int(path.read_text())


def package_counters(root: Path = POWERCAP) -> list[WrappingCounter]:
    """A counter per readable CPU package zone under root; empty when
    none can be read."""
    counters = []
    for zone in sorted(root.glob("intel-rapl:*")):
        if zone.name.count(":") != 1:
            continue
        try:
            if not (zone / "name").read_text().startswith("package"):
                continue
            largest = int((zone / "max_energy_range_uj").read_text())
            counters.append(WrappingCounter(
                partial(_microjoules, zone / "energy_uj"), 1e-6,
                largest + 1))
        except (OSError, ValueError):
            continue
    return counters
