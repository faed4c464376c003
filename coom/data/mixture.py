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


def _weights(plan: str, tokens: dict[str, int], alpha: float,
             budget: int, max_epochs: Optional[float]) -> dict[str, float]:
    if plan == "proportional":
        return {language: float(n) for language, n in tokens.items()}
    if plan == "temperature":
        return {language: float(n) ** alpha
                for language, n in tokens.items()}
    if max_epochs is None:
        raise UserError("data.max_epochs: the unimax plan needs a cap on "
                        "each language's epochs; set it (UniMax's paper "
                        "finds 1 to 5 works)")
    left, allocation = float(budget), {}
    ordered = sorted(tokens, key=lambda language: (tokens[language],
                                                   language))
    for index, language in enumerate(ordered):
        part = min(left / (len(ordered) - index),
                   max_epochs * tokens[language])
        allocation[language] = part
        left -= part
    return allocation


def plan_shares(plan: str, tokens: dict[str, int], budget: int,
                alpha: float = 0.3,
                max_epochs: Optional[float] = None
                ) -> dict[str, LanguageShare]:
    """Each language's share of budget tokens under plan, given its
    prepared tokens; refuses in one line a plan that cannot be met."""
    if plan not in PLANS:
        raise UserError(f"data.mixture: unknown plan '{plan}'; expected "
                        f"one of {', '.join(PLANS)}")
    empty = sorted(language for language, n in tokens.items() if n <= 0)
    if empty or not tokens:
        raise UserError(f"data.languages: {', '.join(empty) or 'none'} "
                        "has no training tokens; give it data or leave it "
                        "out")
    weights = _weights(plan, tokens, alpha, budget, max_epochs)
    total = sum(weights.values())
    shares = {language: LanguageShare(tokens[language], weight / total,
                                      weight / total * budget
                                      / tokens[language])
              for language, weight in weights.items()}
    if max_epochs is not None:
        over = {language: share.epochs for language, share in shares.items()
                if share.epochs > max_epochs * (1 + 1e-9)}
        if over:
            worst = max(over, key=over.get)
            raise UserError(
                f"data.max_epochs: the {plan} plan repeats {worst} "
                f"{over[worst]:.2f} times, more than {max_epochs:g}; "
                "train fewer tokens, add data, or raise data.max_epochs")
    return shares


def language_mixture(languages: list[str], tokens: list[int], plan: str,
                     budget: int, alpha: float = 0.3,
                     max_epochs: Optional[float] = None
                     ) -> tuple[dict[str, LanguageShare], list[float]]:
    """The plan over the languages of datasets with these training
    tokens, and each dataset's blend weight: its language's share, split
    among the language's datasets by their tokens."""
    per_language: dict[str, int] = {}
    for language, count in zip(languages, tokens, strict=True):
        per_language[language] = per_language.get(language, 0) + count
    shares = plan_shares(plan, per_language, budget, alpha, max_epochs)
    weights = [shares[language].share * count / per_language[language]
               for language, count in zip(languages, tokens)]
    return shares, weights


def describe_plan(plan: str, shares: dict[str, LanguageShare]) -> str:
    """The plan as lines of text, the largest share first."""
    lines = [f"language mixture ({plan}): language, share of the run's "
             "tokens, epochs of its data, its training tokens"]
    for language, share in sorted(shares.items(),
                                  key=lambda item: -item[1].share):
        lines.append(f"  {language:>5} {share.share:8.2%} "
                     f"{share.epochs:8.3f} {share.tokens:>14,}")
    return "\n".join(lines)
