"""Meters, clocks and a GPU whose readings the tests decide."""
from coom.energy.meter import EnergyMeter


class Source:
    """A counter already in joules, moved by the test."""

    def __init__(self):
        self.total = 0.0

    def joules(self) -> float:
        return self.total


def fake_meter(sources=("gpu",), machine_leader=True):
    """A meter over test-driven sources; the others unreadable."""
    counters = {name: [Source()] for name in sources}
    reasons = {name: "not on this test machine"
               for name in ("gpu", "cpu") if name not in sources}
    return EnergyMeter(counters, reasons, machine_leader)


def add(meter: EnergyMeter, source: str, joules: float) -> None:
    meter.counters[source][0].total += joules


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimulatedGpu:
    """A GPU under a power limit. A step draws static watts whatever
    its clock, plus dynamic power that grows as the cube of the clock
    (voltage rises with frequency), and its time is inverse to the
    clock. A limit below the step's demand lowers the clock until the
    power fits: the step slows, but spends fewer joules, so energy and
    time trade off.

    Args:
        demand: watts a step draws without a limit.
        static: watts drawn whatever the speed.
        step_seconds: time of a step without a limit.
    """

    def __init__(self, low=200.0, high=700.0, original=650.0, demand=600.0,
                 static=120.0, step_seconds=0.5):
        self.low, self.high = low, high
        self.limit = original
        self.demand, self.static = demand, static
        self.step_seconds = step_seconds
        self.history = []
        self.joules = 0.0
        self.seconds = 0.0

    def range_watts(self):
        return self.low, self.high

    def get_watts(self):
        return self.limit

    def set_watts(self, watts):
        assert self.low <= watts <= self.high
        self.limit = watts
        self.history.append(watts)

    def step_cost(self, watts):
        """Joules and seconds of a step under a limit of watts."""
        power = min(watts, self.demand)
        clock = ((power - self.static) / (self.demand - self.static)) \
            ** (1 / 3)
        seconds = self.step_seconds / clock
        return power * seconds, seconds

    def step(self):
        joules, seconds = self.step_cost(self.limit)
        self.joules += joules
        self.seconds += seconds
