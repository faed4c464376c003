"""Trading energy against time: Zeus's cost and the Pareto front.

Zeus (You, Chung and Chowdhury, NSDI'23) prices a run as
``eta * energy + (1 - eta) * max_power * time``: eta = 1 counts only
joules, eta = 0 only time, and max_power (the most the GPUs may draw)
turns seconds into joules, so both terms share a unit. Per token, energy
is joules per token and time seconds per token.
"""
from typing import Callable, Sequence, TypeVar

Point = TypeVar("Point")


def zeus_cost(joules: float, seconds: float, eta: float,
              max_power_w: float) -> float:
    """Zeus's cost of spending joules over seconds."""
    return eta * joules + (1 - eta) * max_power_w * seconds


def pareto_front(points: Sequence[Point], energy: Callable[[Point], float],
                 time: Callable[[Point], float]) -> list[Point]:
    """The points that no other point beats in energy without losing in
    time, fastest first."""
    front, least = [], float("inf")
    for point in sorted(points, key=lambda p: (time(p), energy(p))):
        if energy(point) < least:
            front.append(point)
            least = energy(point)
    return front
