"""Zeus's cost and the Pareto front of energy and time."""
import pytest

from coom.energy.tradeoff import pareto_front, zeus_cost


def test_zeus_cost_weighs_energy_against_time_at_max_power():
    assert zeus_cost(300.0, 2.0, 1.0, 700.0) == 300.0
    assert zeus_cost(300.0, 2.0, 0.0, 700.0) == 1400.0
    assert zeus_cost(300.0, 2.0, 0.25, 700.0) == pytest.approx(
        0.25 * 300 + 0.75 * 1400)


def test_pareto_front_keeps_points_no_other_beats_in_both():
    points = {"fast": (5.0, 1.0), "frugal": (2.0, 3.0),
              "middle": (3.0, 2.0), "worse": (4.0, 2.5),
              "slow_and_hungry": (6.0, 4.0), "twin": (3.0, 2.0),
              "tied_time": (2.5, 3.0)}
    front = pareto_front(list(points), lambda p: points[p][0],
                         lambda p: points[p][1])
    assert front == ["fast", "middle", "frugal"]
    for name in set(points) - set(front):
        energy, time = points[name]
        assert any(points[f][0] <= energy and points[f][1] <= time
                   for f in front)
