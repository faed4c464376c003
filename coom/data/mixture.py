"""Sampling plans over languages: which share of the training tokens each
language gets.

A plan reads each language's prepared training tokens n_l and the run's
token budget B (steps x global batch x sequence length) and gives each
language a share p_l of B, so that it is seen p_l * B / n_l times (its
epochs):

- ``proportional``: p_l = n_l / sum(n), the data as it comes;
- ``temperature``: p_l proportional to n_l ** alpha, as mT5 and XLM-R
  sample (alpha 0.3; 1 is proportional, 0 uniform), which lifts rare
  languages;
- ``unimax`` (Chung et al., 2023, arXiv 2304.09151): the budget spread
  uniformly over the languages, except that none is repeated more than
  max_epochs times; what a capped language cannot take goes to the
  others, again uniformly. Languages are visited from the smallest up:
  each takes the lesser of an equal part of what is left and
  max_epochs * n_l.

Any plan refuses a budget that would repeat a language more than
max_epochs times, where max_epochs is set.

A run may change its plan at given steps (``data.mixture_schedule``):
each phase's plan shares that phase's tokens, and max_epochs caps each
language's repeats over the whole run, so UniMax in a later phase caps a
language at what the earlier phases left of its epochs.
"""
from dataclasses import dataclass
from typing import Optional

from coom.errors import UserError

PLANS = ("proportional", "temperature", "unimax")


@dataclass(frozen=True)
class LanguageShare:
    """One language's part of a plan."""

    tokens: int
    """Its prepared training tokens, n_l."""

    share: float
    """Its share p_l of the run's tokens."""

    epochs: float
    """How many times the run sees its tokens: p_l * budget / n_l."""


@dataclass(frozen=True)
class MixturePhase:
    """The steps of a run that one plan covers."""

    step: int
    """The first of its steps (counted from 0)."""

    steps: int
    """How many steps it covers."""

    plan: str
    """Its plan: one of PLANS."""

    shares: dict[str, LanguageShare]
    """Each language's part of the phase's tokens."""


def _weights(plan: str, tokens: dict[str, int], alpha: float,
             budget: int, room: Optional[dict[str, float]]
             ) -> dict[str, float]:
    if plan == "proportional":
        return {language: float(n) for language, n in tokens.items()}
    if plan == "temperature":
        return {language: float(n) ** alpha
                for language, n in tokens.items()}
    if room is None:
        raise UserError("data.max_epochs: the unimax plan needs a cap on "
                        "each language's epochs; set it (UniMax's paper "
                        "finds 1 to 5 works)")
    left, allocation = float(budget), {}
    ordered = sorted(tokens, key=lambda language: (room[language],
                                                   language))
    for index, language in enumerate(ordered):
        part = min(left / (len(ordered) - index), room[language])
        allocation[language] = part
        left -= part
    return allocation


def plan_shares(plan: str, tokens: dict[str, int], budget: int,
                alpha: float = 0.3,
                max_epochs: Optional[float] = None,
                used: Optional[dict[str, float]] = None
                ) -> dict[str, LanguageShare]:
    """Each language's share of budget tokens under plan, given its
    prepared tokens and the tokens of it that earlier phases of the run
    used; refuses in one line a plan that cannot be met."""
    if plan not in PLANS:
        raise UserError(f"data.mixture: unknown plan '{plan}'; expected "
                        f"one of {', '.join(PLANS)}")
    empty = sorted(language for language, n in tokens.items() if n <= 0)
    if empty or not tokens:
        raise UserError(f"data.languages: {', '.join(empty) or 'none'} "
                        "has no training tokens; give it data or leave it "
                        "out")
    used = used or {}
    room = None if max_epochs is None else {
        language: max(0.0, max_epochs * n - used.get(language, 0.0))
        for language, n in tokens.items()}
    weights = _weights(plan, tokens, alpha, budget, room)
    total = sum(weights.values())
    shares = {language: LanguageShare(tokens[language], weight / total,
                                      weight / total * budget
                                      / tokens[language])
              for language, weight in weights.items()}
    if max_epochs is not None:
        repeats = {language: share.epochs
                   + used.get(language, 0.0) / tokens[language]
                   for language, share in shares.items()}
        over = {language: epochs for language, epochs in repeats.items()
                if epochs > max_epochs * (1 + 1e-9)}
        if over:
            worst = max(over, key=over.get)
            raise UserError(
                f"data.max_epochs: the {plan} plan repeats {worst} "
                f"{over[worst]:.2f} times, more than {max_epochs:g}; "
                "train fewer tokens, add data, or raise data.max_epochs")
    return shares


def plan_phases(tokens: dict[str, int],
                changes: list[tuple[int, str, float]], steps: int,
                step_tokens: int, max_epochs: Optional[float] = None
                ) -> list[MixturePhase]:
    """The run's phases: changes are (first step, plan, alpha) in step
    order, the first at step 0; each plan shares its phase's tokens
    (step_tokens a step), and max_epochs caps the whole run's repeats."""
    ends = [step for step, _, _ in changes[1:]] + [steps]
    used = dict.fromkeys(tokens, 0.0)
    phases = []
    for (step, plan, alpha), end in zip(changes, ends, strict=True):
        budget = (end - step) * step_tokens
        shares = plan_shares(plan, tokens, budget, alpha, max_epochs, used)
        for language, share in shares.items():
            used[language] += share.share * budget
        phases.append(MixturePhase(step, end - step, plan, shares))
    return phases


def language_tokens(languages: list[str], tokens: list[int]
                    ) -> dict[str, int]:
    """The training tokens of each language, given its datasets'."""
    per_language: dict[str, int] = {}
    for language, count in zip(languages, tokens, strict=True):
        per_language[language] = per_language.get(language, 0) + count
    return per_language


def blend_weights(phase: MixturePhase, languages: list[str],
                  tokens: list[int]) -> list[float]:
    """Each dataset's blend weight in phase: its language's share, split
    among the language's datasets by their training tokens."""
    per_language = language_tokens(languages, tokens)
    return [phase.shares[language].share * count / per_language[language]
            for language, count in zip(languages, tokens, strict=True)]


def describe_plan(phases: list[MixturePhase]) -> str:
    """The phases' plans as lines of text, the largest share first."""
    lines = []
    for phase in phases:
        steps = "" if len(phases) == 1 else \
            f" steps {phase.step + 1}-{phase.step + phase.steps}"
        lines.append(f"language mixture{steps} ({phase.plan}): language, "
                     "share of the tokens, epochs of its data, its "
                     "training tokens")
        for language, share in sorted(phase.shares.items(),
                                      key=lambda item: -item[1].share):
            lines.append(f"  {language:>5} {share.share:8.2%} "
                         f"{share.epochs:8.3f} {share.tokens:>14,}")
    return "\n".join(lines)


def plan_record(phases: list[MixturePhase]) -> dict:
    """The phases as the run's mixture.json holds them."""
    return {"phases": [
        {"step": phase.step, "steps": phase.steps, "plan": phase.plan,
         "languages": {language: vars(share)
                       for language, share in phase.shares.items()}}
        for phase in phases]}
