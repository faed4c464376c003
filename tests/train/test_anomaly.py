"""The anomaly guard's judgements against their definitions."""
import math
import statistics

import pytest

from coom.config.anomaly import AnomalyConfig
from coom.errors import UserError
from coom.train.anomaly import LOG, ROLLBACK, SKIP, AnomalyGuard

LOSSES = [3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 3.1, 2.9]


def _guard(**fields) -> AnomalyGuard:
    guard = AnomalyGuard(AnomalyConfig(**{"min_steps": 4, "window": 6,
                                          **fields}))
    for loss in LOSSES:
        assert guard.judge(loss, 1.0 + loss / 100) is None
    return guard


@pytest.mark.parametrize("loss, norm", [
    (math.nan, 1.0), (math.inf, 1.0), (3.0, math.nan), (3.0, -math.inf)])
def test_a_step_that_is_not_finite_is_skipped_whatever_the_policy(loss,
                                                                  norm):
    for policy in ("off", "log", "skip", "rollback"):
        anomaly = _guard(spike=policy).judge(loss, norm)
        assert (anomaly.kind, anomaly.action) == ("not finite", SKIP)


def test_a_spike_lies_beyond_the_deviations_of_the_window():
    """The window holds the last 6 accepted losses; a loss more than 6
    population deviations above their mean is a spike, one just below
    is not."""
    window = LOSSES[-6:]
    limit = statistics.fmean(window) + 6 * statistics.pstdev(window)
    guard = _guard(spike="skip")
    spike = guard.judge(limit + 1e-6, 1.03)
    assert (spike.kind, spike.action) == ("loss spike", SKIP)
    assert spike.deviations == pytest.approx(6, abs=1e-3)
    # The spike was not accepted: the window is unchanged.
    assert guard.judge(limit - 1e-6, 1.03) is None
    assert list(guard.windows["loss"]) == window[1:] + [limit - 1e-6]


def test_gradient_norm_spikes_and_only_upward_moves_count():
    guard = _guard(spike="rollback")
    assert guard.judge(0.0, 1.03) is None
    spike = guard.judge(3.0, 100.0)
    assert (spike.kind, spike.action) == ("grad_norm spike", ROLLBACK)


def test_logged_spikes_are_applied_and_off_sees_none():
    guard = _guard(spike="log")
    anomaly = guard.judge(100.0, 1.0)
    assert anomaly.action == LOG
    assert guard.windows["loss"][-1] == 100.0
    assert _guard(spike="off").judge(100.0, 1.0) is None


def test_too_few_steps_call_nothing_a_spike():
    guard = AnomalyGuard(AnomalyConfig(spike="skip", min_steps=4))
    for loss in (3.0, 3.0, 3.0):
        assert guard.judge(loss, 1.0) is None
    assert guard.judge(1000.0, 1.0) is None


def test_too_many_skipped_steps_in_a_row_stop_the_run():
    guard = _guard(spike="skip", max_in_a_row=3)
    for _ in range(2):
        assert guard.judge(math.nan, 1.0).action == SKIP
    with pytest.raises(UserError, match="training diverged: 3 steps in a "
                       "row had a not finite"):
        guard.judge(math.nan, 1.0)
    guard = _guard(spike="skip", max_in_a_row=3)
    for loss in (math.nan, math.nan, 3.0, math.nan, math.nan):
        guard.judge(loss, 1.0)


def test_the_windows_survive_a_checkpoint():
    guard = _guard(spike="skip")
    guard.judge(math.nan, 1.0)
    copy = AnomalyGuard(guard.config)
    copy.load_state_dict(guard.state_dict())
    assert copy.state_dict() == guard.state_dict()
    assert copy.in_a_row == 1
    for loss in (3.0, 50.0):
        assert copy.judge(loss, 1.0) == guard.judge(loss, 1.0)
