"""Choosing a GPU power limit while training, after Zeus (NSDI'23).

A lower power limit slows the GPU less than it saves power, down to a
point; below it, the run takes so much longer that it spends more. Which
limit is best depends on the model, the batch and the GPU, so it is
measured: during the first steps of a run the search sets each candidate
limit in turn, highest first, lets the GPU's power controller settle for
a step, measures a few steps, and then keeps the limit of least Zeus
cost (``coom.energy.tradeoff``). The original limit is put back when
the run ends (``EnergyLedger`` restores it on exit, exceptions and
Ctrl-C/SIGTERM included).

This runs only with ``energy.power_control = true``, which needs
administrator rights on the GPUs. It talks to the GPU through the small
``PowerLimits`` interface, so tests drive it with a simulated GPU; it has
not been run on real hardware in COOM's development.
"""
from dataclasses import dataclass
from typing import Optional, Protocol

from coom.energy.tradeoff import zeus_cost

WATT_STEP = 25.0
"""Spacing of the default candidate limits, as in Zeus."""


class PowerLimits(Protocol):
    """One GPU's power limit, in watts."""

    def range_watts(self) -> tuple[float, float]:
        """The lowest and highest limit the GPU accepts."""

    def get_watts(self) -> float:
        """The limit now."""

    def set_watts(self, watts: float) -> None:
        """Make watts the limit."""


def candidate_limits(low: float, high: float,
                     step: float = WATT_STEP) -> list[float]:
    """Limits from high down to low, step apart, low included."""
    limits, watts = [], high
    while watts > low:
        limits.append(watts)
        watts -= step
    return limits + [low]


@dataclass
class LimitProfile:
    """What one power limit measured, over all the run's GPUs."""

    watts: float
    joules_per_token: float
    seconds_per_token: float
    cost: float
    """Zeus's cost per token."""


class PowerLimitSearch:
    """Measures each candidate limit and keeps the cheapest.

    Every process runs the same search on its own GPU, fed the same
    sums over all processes, so all choose the same limit.

    Args:
        limits: the GPU's power limit.
        candidates: limits to try, in watts (tried highest first).
        eta: Zeus's weight of energy against time, in [0, 1].
        steps: measured steps per limit.
        settle_steps: steps left unmeasured after each change of limit.
        warmup_steps: the run's first steps, left unmeasured because
            compilation and kernel tuning make them slow.
    """

    def __init__(self, limits: PowerLimits, candidates: list[float],
                 eta: float, steps: int, settle_steps: int = 1,
                 warmup_steps: int = 3):
        self.limits = limits
        self.candidates = sorted(set(candidates), reverse=True)
        self.max_watts = limits.range_watts()[1]
        self.eta = eta
        self.steps = steps
        self.settle_steps = settle_steps
        self.profile: list[LimitProfile] = []
        self.original: Optional[float] = None
        self.chosen: Optional[float] = None
        self.watts: Optional[float] = None
        self._skip = warmup_steps + settle_steps
        self._joules = self._seconds = 0.0
        self._tokens = self._counted = 0

    @property
    def finished(self) -> bool:
        return self.chosen is not None

    def _set(self, watts: float) -> None:
        self.limits.set_watts(watts)
        self.watts = watts

    def start(self) -> None:
        """Note the original limit and set the first candidate."""
        self.original = self.limits.get_watts()
        self._set(self.candidates[0])

    def observe(self, joules: float, seconds: float, tokens: int,
                gpus: int) -> None:
        """Account one training step: the joules of all gpus GPUs and
        its seconds, for tokens tokens."""
        if self.finished:
            return
        if self._skip:
            self._skip -= 1
            return
        self._joules += joules
        self._seconds += seconds
        self._tokens += tokens
        self._counted += 1
        if self._counted == self.steps:
            self._close(gpus)

    def _close(self, gpus: int) -> None:
        """Price the limit just measured; set the next, or the best."""
        per_joule = self._joules / self._tokens
        per_second = self._seconds / self._tokens
        self.profile.append(LimitProfile(
            self.watts, per_joule, per_second,
            zeus_cost(per_joule, per_second, self.eta,
                      self.max_watts * gpus)))
        self._joules = self._seconds = 0.0
        self._tokens = self._counted = 0
        if len(self.profile) < len(self.candidates):
            self._set(self.candidates[len(self.profile)])
            self._skip = self.settle_steps
        else:
            self.chosen = min(self.profile, key=lambda p: p.cost).watts
            self._set(self.chosen)

    def restore(self) -> None:
        """Put the original limit back (once; later calls do nothing)."""
        if self.original is not None:
            self._set(self.original)
            self.original = None

    def describe(self) -> str:
        """One line: the limit chosen and what each limit measured."""
        tried = "; ".join(f"{p.watts:.0f} W: {p.joules_per_token:.4g} J/"
                          f"token, {1 / p.seconds_per_token:,.0f} tokens/s"
                          for p in self.profile)
        return (f"power limit {self.chosen:.0f} W chosen for eta "
                f"{self.eta:g} (Zeus's cost); measured {tried}")
