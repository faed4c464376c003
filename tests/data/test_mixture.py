"""Sampling plans over languages against their formulas."""
import pytest

from coom.data.mixture import plan_phases, plan_shares
from coom.errors import UserError

TOKENS = {"en": 1_000_000, "de": 200_000, "sw": 5_000, "yo": 1_000}


def test_proportional_follows_the_data():
    shares = plan_shares("proportional", TOKENS, budget=600_000)
    total = sum(TOKENS.values())
    for language, n in TOKENS.items():
        assert shares[language].share == pytest.approx(n / total)
        # Every language is seen equally often.
        assert shares[language].epochs == pytest.approx(600_000 / total)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_temperature_raises_counts_to_alpha(alpha):
    shares = plan_shares("temperature", TOKENS, budget=600_000,
                         alpha=alpha)
    total = sum(n ** alpha for n in TOKENS.values())
    for language, n in TOKENS.items():
        assert shares[language].share == pytest.approx(n ** alpha / total)
        assert shares[language].epochs == pytest.approx(
            shares[language].share * 600_000 / n)
    assert sum(s.share for s in shares.values()) == pytest.approx(1.0)


def test_unimax_is_uniform_up_to_the_epoch_cap():
    budget, cap = 600_000, 4.0
    shares = plan_shares("unimax", TOKENS, budget=budget, max_epochs=cap)
    # yo and sw hit the cap; de and en share the rest equally.
    assert shares["yo"].epochs == pytest.approx(cap)
    assert shares["sw"].epochs == pytest.approx(cap)
    rest = (budget - cap * (1_000 + 5_000)) / 2
    for language in ("de", "en"):
        assert shares[language].share * budget == pytest.approx(rest)
    assert max(s.epochs for s in shares.values()) == pytest.approx(cap)
    assert sum(s.share for s in shares.values()) == pytest.approx(1.0)


def test_unimax_without_capped_languages_is_uniform():
    shares = plan_shares("unimax", {"a": 1000, "b": 3000}, budget=1000,
                         max_epochs=1.0)
    assert shares["a"].share == shares["b"].share == 0.5


def test_a_plan_that_repeats_a_language_too_often_is_refused():
    with pytest.raises(UserError, match="repeats yo"):
        plan_shares("temperature", TOKENS, budget=600_000, alpha=0.3,
                    max_epochs=4.0)
    # The cap cannot hold when the budget exceeds every language's
    # max_epochs times its data.
    with pytest.raises(UserError, match="more than 2"):
        plan_shares("unimax", TOKENS, budget=10**7, max_epochs=2.0)


@pytest.mark.parametrize("plan, tokens, kwargs, message", [
    ("zipf", TOKENS, {}, "unknown plan 'zipf'"),
    ("unimax", TOKENS, {}, "needs a cap"),
    ("proportional", {"en": 10, "xx": 0}, {}, "xx has no training"),
    ("proportional", {}, {}, "none has no training"),
])
def test_bad_plans_are_refused_in_one_line(plan, tokens, kwargs, message):
    with pytest.raises(UserError, match=message) as error:
        plan_shares(plan, tokens, budget=1000, **kwargs)
    assert "\n" not in str(error.value)


def test_phases_split_the_run_and_cap_its_repeats_as_a_whole():
    """A proportional start, then UniMax: each plan shares its own
    phase's tokens, and UniMax caps yo and sw at what the first phase
    left of their max_epochs."""
    cap = 4.0
    phases = plan_phases(TOKENS, [(0, "proportional", 0.3),
                                  (100, "unimax", 0.3)],
                         steps=600, step_tokens=1000, max_epochs=cap)
    assert [(p.step, p.steps, p.plan) for p in phases] == [
        (0, 100, "proportional"), (100, 500, "unimax")]
    first, second = (phase.shares for phase in phases)
    assert first == plan_shares("proportional", TOKENS, budget=100_000)
    for language in ("yo", "sw"):
        total = first[language].epochs + second[language].epochs
        assert total == pytest.approx(cap)
    assert second["en"].share == pytest.approx(second["de"].share)
    assert sum(s.share for s in second.values()) == pytest.approx(1.0)


def test_phases_that_together_repeat_a_language_too_often_are_refused():
    # Uniform shares repeat yo 3 times in each phase: 6 in all.
    uniform = [(0, "temperature", 0.0), (1, "temperature", 0.0)]
    with pytest.raises(UserError, match="repeats yo 6.00 times, more "
                       "than 4"):
        plan_phases(TOKENS, uniform, steps=2, step_tokens=12_000,
                    max_epochs=4.0)
    assert len(plan_phases(TOKENS, uniform, steps=2, step_tokens=12_000,
                           max_epochs=6.0)) == 2
