"""The energy section: accounting, budget and power-limit search."""
from dataclasses import dataclass, field
from typing import Optional

from coom.config.checks import positive, require


@dataclass
class EnergyConfig:
    """Energy accounting, the energy budget and the opt-in power-limit
    search (``coom/energy``, ``docs/energy.md``). Energy is metered
    wherever a meter is readable: GPUs through NVML, CPU packages through
    RAPL."""

    grid_gco2_per_kwh: float = 480.0
    """Carbon intensity of the electricity, in grams of CO2-equivalent per
    kWh, for the co2e_kg metric. The default is the world's average
    generation in 2023 (Ember, Global Electricity Review 2024); set your
    grid's."""

    budget_kwh: Optional[float] = None
    """Checkpoint and exit after the first step at which the run has used
    this many kWh, summed over all processes and metered sources and over
    resumed attempts. It needs a readable meter."""

    power_control: bool = False
    """Search the GPUs' power limits during the first steps and keep the
    one of least Zeus cost, restoring the original limit at exit. It
    changes hardware settings and needs administrator rights; off unless
    asked for. Not exercised on real GPUs in COOM's development."""

    power_control_eta: float = 0.5
    """Zeus's eta for the power-limit search: 1 minimises energy alone, 0
    time alone."""

    power_limits: list[float] = field(default_factory=list)
    """Power limits to try, in watts; empty: from the GPU's highest to its
    lowest limit in 25 W steps."""

    power_control_steps: int = 5
    """Measured training steps per power limit (after three warm-up steps
    of the run and one settling step per limit)."""

    def __post_init__(self):
        require(self.grid_gco2_per_kwh >= 0, "grid_gco2_per_kwh",
                "must be >= 0")
        if self.budget_kwh is not None:
            positive(self, "budget_kwh")
        require(0 <= self.power_control_eta <= 1, "power_control_eta",
                f"must lie in [0, 1], got {self.power_control_eta}")
        require(all(w > 0 for w in self.power_limits), "power_limits",
                "every limit must be positive")
        positive(self, "power_control_steps")
