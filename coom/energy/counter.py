"""Cumulative energy from a hardware counter that wraps around.

Energy counters count up in their own unit (RAPL: microjoules, NVML:
millijoules) and return to zero past their range. The difference of two
reads is exact as long as the counter wrapped at most once in between,
so a counter is read at every phase boundary of a run (each step), far
more often than its shortest wrap period (RAPL: about 262 kJ, some
twenty minutes for a CPU package at 200 W; NVML: 64 bits, never). A
phase longer than that (preparing a large corpus before the first step)
under-counts the CPU packages by whole ranges.
"""
from typing import Callable, Optional


class WrappingCounter:
    """Joules a hardware counter has counted since this object was made.

    Args:
        read: returns the counter's raw value.
        joules_per_unit: 1e-6 for microjoules, 1e-3 for millijoules.
        wrap: the number of units after which the counter is back at
            zero (its largest value plus one); None for a counter that
            never wraps (NVML's 64 bits), whose read going backwards is a
            reset (a driver reload, a GPU reset): that interval counts
            nothing, rather than 2^64 units.
    """

    def __init__(self, read: Callable[[], int], joules_per_unit: float,
                 wrap: Optional[int]):
        self._read = read
        self._joules_per_unit = joules_per_unit
        self._wrap = wrap
        self._last = read()
        self._units = 0  # integer sum: no rounding drift over a long run

    def joules(self) -> float:
        """Energy since the counter was made."""
        now = self._read()
        step = now - self._last
        if step < 0:
            step = 0 if self._wrap is None else step + self._wrap
        self._last = now
        self._units += step
        return self._units * self._joules_per_unit


class NoMeterError(Exception):
    """A meter that cannot be read here; the message says why."""
