"""``coom bench --energy-sweep``: joules per token against tokens/s over
settings that leave the hardware's own settings alone.

The candidates change how a step is computed, not what it trains on:
the micro-batch size (the global batch, and so the optimisation, stays),
activation recomputation (``train.recompute``), ``torch.compile``,
COOM's Triton kernels and FP8 (where the GPU has FP8 units; FP8 changes
the numerics slightly, docs/fp8.md). On a CPU only the micro-batch size
varies by default: there are no kernels or FP8 units, compiling takes
longer than the sweep, and recomputation saves memory, not energy.

By default each setting is changed alone from the recipe's, a handful of
candidates; ``--grid`` tries every combination. Each is measured as
``coom bench`` measures (warm-up steps, then timed steps with the device
synchronised, energy from the meters), one after another in this
process. The Pareto front of energy and time is reported, and the
candidate of least Zeus cost for the chosen eta is written as a recipe:
the base recipe plus its overrides.
"""
import functools
import gc
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from coom.config import RunConfig, load_config
from coom.energy.tradeoff import pareto_front, zeus_cost
from coom.errors import UserError
from coom.tools.bench import run_bench
from coom.train.device import resolve_device

Overrides = dict[str, str]
"""Config field (section.field) -> value, as YAML text."""


def _value(config: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def default_axes(config: RunConfig) -> dict[str, list[str]]:
    """The settings to vary and their values, for config's device."""
    train = config.train
    size = train.micro_batch_size
    sizes = sorted({s for s in (size // 2, size, size * 2)
                    if s >= 1 and train.global_batch_size % s == 0})
    axes = {"train.micro_batch_size": [str(s) for s in sizes]}
    device = resolve_device(train.device)
    if device.type == "cuda":
        axes["train.recompute"] = ["none", "selective"]
        axes["train.compile"] = ["false", "true"]
        axes["train.kernels"] = ["true", "false"]
        if torch.cuda.get_device_capability(device) >= (9, 0):
            axes["fp8.recipe"] = ["off", "blockwise"]
    return axes


def parse_axes(items: list[str], recipe: str,
               overrides: list[str]) -> dict[str, list[str]]:
    """--vary KEY=V1,V2 options as axes, each value checked against the
    config (a bad one stops the sweep before it measures anything)."""
    axes = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise UserError(f"--vary {item}: write KEY=V1,V2,..., e.g. "
                            "--vary train.micro_batch_size=2,4,8")
        axes[key.strip()] = [value.strip() for value in values.split(",")]
        for value in axes[key.strip()]:
            load_config(recipe, overrides + [f"{key.strip()}={value}"])
    return axes


def candidates(recipe: str, overrides: list[str],
               axes: dict[str, list[str]], grid: bool) -> list[Overrides]:
    """The recipe's own setting ({}) first, then each setting changed
    alone, or (grid) every combination; none twice. A value counts as a
    change when the config it loads to differs (so 'off' and false, or
    4 and 4.0, are one value)."""
    base = load_config(recipe, overrides)

    @functools.cache
    def changed(key: str, text: str) -> bool:
        config = load_config(recipe, overrides + [f"{key}={text}"])
        return _value(config, key) != _value(base, key)

    if grid:
        combos = (dict(zip(axes, values))
                  for values in itertools.product(*axes.values()))
    else:
        combos = ({key: text} for key, values in axes.items()
                  for text in values)
    found = [{}]
    for combo in combos:
        chosen = {k: v for k, v in combo.items() if changed(k, v)}
        if chosen not in found:
            found.append(chosen)
    return found


def label(overrides: Overrides) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items()) \
        or "recipe's setting"


def _release_memory(device: torch.device) -> None:
    """Free one candidate's model and compiled code before the next
    (compiled blocks would otherwise pile up past dynamo's cache
    limit and fall back to eager)."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(recipe: str, overrides: list[str], candidate: Overrides,
            steps: int, warmup: int, real_data: bool) -> dict:
    """One candidate's bench figures, or its error."""
    row = {"overrides": candidate}
    try:
        config = load_config(recipe, overrides + [
            f"{k}={v}" for k, v in candidate.items()])
        row |= run_bench(config, steps, warmup, real_data)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except UserError as error:
        row["error"] = str(error)
    return row


def run_sweep(recipe: str, overrides: list[str], axes: dict, grid: bool,
              steps: int, warmup: int, real_data: bool) -> list[dict]:
    """Measure every candidate; the recipe's own setting is the first."""
    device = resolve_device(load_config(recipe, overrides).train.device)
    rows = []
    bar = tqdm(candidates(recipe, overrides, axes, grid), desc="energy sweep",
               unit="setting", dynamic_ncols=True)
    for candidate in bar:
        bar.set_postfix_str(label(candidate))
        rows.append(measure(recipe, overrides, candidate, steps, warmup,
                            real_data))
        _release_memory(device)
    return rows


@dataclass
class Choice:
    """The sweep's verdict over its measured candidates."""

    front: list[dict]
    """Pareto front of joules per token and seconds per token."""

    best: dict
    """The candidate of least Zeus cost."""

    eta: float
    max_power_w: float
    max_power_source: str
    """Where max_power_w comes from."""


def _seconds_per_token(row: dict) -> float:
    return 1 / row["tokens_per_s"]


def choose(rows: list[dict], eta: float,
           max_power_w: Optional[float] = None) -> Optional[Choice]:
    """The front and the best candidate; None when no candidate was
    metered. max_power_w: the price of time in Zeus's cost; default
    NVML's power limit, else (no NVML) the highest mean power measured.
    """
    measured = [row for row in rows if "joules_per_token" in row]
    if not measured:
        return None
    source = "--max-power"
    if max_power_w is None:
        limits = [row["power_limit_w"] for row in measured
                  if "power_limit_w" in row]
        max_power_w, source = (max(limits), "NVML's power limit") \
            if limits else (max(row["average_watts"] for row in measured),
                            "no power limit readable: the highest mean "
                            "power measured")
    front = pareto_front(measured, lambda r: r["joules_per_token"],
                         _seconds_per_token)
    best = min(measured, key=lambda r: zeus_cost(
        r["joules_per_token"], _seconds_per_token(r), eta, max_power_w))
    return Choice(front, best, eta, max_power_w, source)


def describe_sweep(rows: list[dict], choice: Optional[Choice]) -> str:
    """The lines ``coom bench --energy-sweep`` prints."""
    lines = [f"{'setting':44} {'tokens/s':>10} {'J/token':>9} "
             f"{'W':>6}"]
    for row in rows:
        name = label(row["overrides"])
        if "error" in row:
            lines.append(f"{name:44} failed: {row['error']}")
            continue
        energy = (f"{row['joules_per_token']:9.4f} "
                  f"{row['average_watts']:6.0f}"
                  if "joules_per_token" in row else f"{'-':>9} {'-':>6}")
        marks = ""
        if choice is not None:
            on_front = any(row is point for point in choice.front)
            marks = (" front" if on_front else "") \
                + (" best" if row is choice.best else "")
        lines.append(f"{name:44} {row['tokens_per_s']:10,.0f} {energy}"
                     f"{marks}")
    if choice is None:
        reasons = next((r["energy_unmetered"] for r in rows
                        if "energy_unmetered" in r), {})
        why = "; ".join(reasons.values()) or "every candidate failed"
        lines.append(f"energy not measured ({why}): no Pareto front and "
                     "no recipe")
        return "\n".join(lines)
    best, base = choice.best, rows[0]
    lines.append(f"best for eta {choice.eta:g} (Zeus's cost, max power "
                 f"{choice.max_power_w:.0f} W: {choice.max_power_source})"
                 f": {label(best['overrides'])}")
    if "joules_per_token" in base:
        lines.append(
            f"against the recipe's setting: J/token "
            f"{best['joules_per_token'] / base['joules_per_token'] - 1:+.1%}"
            f", tokens/s "
            f"{best['tokens_per_s'] / base['tokens_per_s'] - 1:+.1%}")
    return "\n".join(lines)


def _nested(assignments: list[str]) -> dict:
    """'section.field=value' assignments as a recipe's nested mapping."""
    tree = {}
    for assignment in assignments:
        key, _, text = assignment.partition("=")
        *sections, name = key.strip().split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = yaml.safe_load(text)
    return tree


def recipe_text(recipe: str, overrides: list[str], choice: Choice,
                base_row: dict) -> str:
    """The best candidate as a recipe: a comment saying what was measured,
    ``base`` (the swept recipe) and the overrides."""
    best = choice.best
    base = str(Path(recipe).resolve()) \
        if recipe.endswith((".yaml", ".yml")) else recipe
    tree = {"base": base} | _nested(overrides + [
        f"{k}={v}" for k, v in best["overrides"].items()])
    header = [
        f"Written by coom bench --energy-sweep on "
        f"{time.strftime('%Y-%m-%d')}, {best['device']}: the setting of "
        f"least Zeus cost for eta {choice.eta:g} (max power "
        f"{choice.max_power_w:.0f} W, {choice.max_power_source}).",
        f"Measured {best['joules_per_token']:.4f} J/token, "
        f"{best['tokens_per_s']:,.0f} tokens/s ({best['steps']} steps).",
    ]
    if "joules_per_token" in base_row:
        header.append(f"The recipe's own setting: "
                      f"{base_row['joules_per_token']:.4f} J/token, "
                      f"{base_row['tokens_per_s']:,.0f} tokens/s.")
    comment = "".join(f"# {line}\n" for line in header)
    return comment + yaml.safe_dump(tree, sort_keys=False)
