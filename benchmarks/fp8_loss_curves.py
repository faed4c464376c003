"""Compare training runs' losses (bf16, FP8, and any more runs, such as
a second bf16 run for the spread between two bf16 runs) and plot them.

Usage: python3 benchmarks/fp8_loss_curves.py BF16_RUN [RUN ...]
[--group BF16_RUN RUN ...] ... [--spread BF16_RUN_2] --plot
docs/fp8_loss.png, two runs at least, where each run is a run directory
(or a folder with its metrics.jsonl), named in the plot by its folder's
name. Each run is compared with the first run of its group: the
positional runs are one group, each --group another (for instance the
bf16 and FP8 runs of another seed, whose validation samples differ).
Runs may have stopped at different steps: each is compared at the last
evaluation both reached, and over the last --window logged steps both
reached. Prints those losses and the relative differences.

With several groups of a bf16 run and an FP8 run each (seed pairs: the
same seed and data within a pair, another seed in each), it also prints
the loss protocol's figure (docs/fp8.md): the mean over the pairs of
FP8's relative gap in final validation loss, with its standard error,
against DeepSeek-V3's 0.25%.
"""
import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (needs the backend first)

from coom.train.metrics import read_metrics  # noqa: E402


def _series(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


def _smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def compare(bf16: list[dict], other: list[dict], window: int) -> dict:
    """Losses of both runs at the last evaluation both reached, and the
    mean training loss over the last window logged steps both reached."""
    valid = [_series(run, "val_loss") for run in (bf16, other)]
    train = [_series(run, "loss") for run in (bf16, other)]
    shared = set(valid[0]) & set(valid[1])
    logged = sorted(set(train[0]) & set(train[1]))[-window:]
    if not shared or not logged:
        raise SystemExit("the runs share no evaluation or logged step")
    step = max(shared)
    return {"step": step, "logged": (logged[0], logged[-1]),
            "val": [series[step] for series in valid],
            "train": [statistics.fmean(series[s] for s in logged)
                      for series in train]}


def _read_runs(folders: list[Path], names: set) -> dict[str, list]:
    runs = {}
    for folder in folders:
        if folder.name in names:
            raise SystemExit(f"two runs share the folder name {folder.name}")
        names.add(folder.name)
        runs[folder.name] = read_metrics(folder)
    return runs


def _print_comparisons(group: dict[str, list], window: int) -> None:
    base, *others = group
    for name in others:
        result = compare(group[base], group[name], window)
        first, last = result["logged"]
        for label, (ref, ours) in (
                (f"validation at step {result['step']}", result["val"]),
                (f"training, mean of steps {first}-{last}",
                 result["train"])):
            print(f"{name} vs {base}, {label}: {ours:.4f} vs {ref:.4f} "
                  f"({(ours - ref) / ref:+.3%} relative)")


BOUND = 0.0025
"""DeepSeek-V3's relative loss gap of FP8 against bf16."""


def pair_gaps(groups: list[dict[str, list]], window: int) -> list[float]:
    """Each group's second run's relative gap in final validation loss
    against its first (bf16) run."""
    gaps = []
    for group in groups:
        base, other, *_ = group
        reference, ours = compare(group[base], group[other], window)["val"]
        gaps.append((ours - reference) / reference)
    return gaps


def _print_protocol(gaps: list[float]) -> None:
    """The mean gap, its standard error, and whether the mean lies
    within the bound plus two standard errors."""
    mean = statistics.fmean(gaps)
    error = statistics.stdev(gaps) / len(gaps) ** 0.5
    verdict = "within" if abs(mean) <= BOUND + 2 * error else "beyond"
    print(f"FP8 against bf16 over {len(gaps)} seed pairs: mean gap "
          f"{mean:+.3%}, standard error {error:.3%}, {verdict} "
          f"{BOUND:.2%} + 2 standard errors ({BOUND + 2 * error:.3%}); "
          f"gaps {', '.join(f'{gap:+.3%}' for gap in gaps)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+",
                        help="the bf16 run first, then the others")
    parser.add_argument("--group", type=Path, nargs="+", action="append",
                        default=[], help="another set of runs, its bf16 "
                        "run first, compared with that one")
    parser.add_argument("--spread", type=Path,
                        help="a second bf16 run (other rounding)")
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--window", type=int, default=100,
                        help="logged steps averaged for the training loss")
    args = parser.parse_args()
    names = set()
    groups = [_read_runs(folders, names)
              for folders in (args.runs, *args.group)]
    if args.spread:
        groups[0]["bf16 (second run)"] = read_metrics(args.spread)
    if any(len(group) < 2 for group in groups):
        parser.error("give at least two runs in each group")
    figure, (train_axis, valid_axis, ratio_axis) = plt.subplots(
        1, 3, figsize=(15, 4))
    for group in groups:
        base, *_ = group
        reference = _series(group[base], "val_loss")
        for name, records in group.items():
            train = _series(records, "loss")
            valid = _series(records, "val_loss")
            train_axis.plot(list(train), _smooth(list(train.values()), 20),
                            label=name)
            valid_axis.plot(list(valid), list(valid.values()), marker="o",
                            label=name)
            print(f"{name}: {max(train)} steps")
            if name == base:
                continue
            shared = [step for step in valid if step in reference and step]
            ratio_axis.plot(shared, [100 * (valid[s] / reference[s] - 1)
                                     for s in shared], marker="o",
                            label=f"{name} vs {base}")
    for group in groups:
        _print_comparisons(group, args.window)
    if len(groups) > 1:
        _print_protocol(pair_gaps(groups, args.window))
    ratio_axis.axhline(0, color="black", linewidth=0.8)
    train_axis.set(title="training loss (moving mean of 20)", xlabel="step",
                   ylabel="loss")
    valid_axis.set(title="validation loss", xlabel="step")
    ratio_axis.set(title="validation loss against the group's first run",
                   xlabel="step", ylabel="difference (%)")
    for axis in (train_axis, valid_axis, ratio_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
