"""Compare training runs' losses (bf16, FP8, and any more runs, such as
a second bf16 run for the spread between two bf16 runs) and plot them.

Usage: python3 benchmarks/fp8_loss_curves.py BF16_RUN [RUN ...]
[--spread BF16_RUN_2] --plot docs/fp8_loss.png, two runs at least, where
each run is a run directory (or a folder with its metrics.jsonl), named
in the plot by its folder's name. Runs may have stopped at different
steps: each is compared with the first (bf16) at the last evaluation
both reached, and over the last --window logged steps both reached.
Prints those losses and the relative differences against the first run.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+",
                        help="the bf16 run first, then the others")
    parser.add_argument("--spread", type=Path,
                        help="a second bf16 run (other rounding)")
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--window", type=int, default=100,
                        help="logged steps averaged for the training loss")
    args = parser.parse_args()
    if len(args.runs) + bool(args.spread) < 2:
        parser.error("give at least two runs")
    runs = {folder.name: read_metrics(folder) for folder in args.runs}
    if len(runs) < len(args.runs):
        parser.error("two runs share a folder name")
    if args.spread:
        runs["bf16 (second run)"] = read_metrics(args.spread)
    base, *_ = runs
    figure, (train_axis, valid_axis, ratio_axis) = plt.subplots(
        1, 3, figsize=(15, 4))
    reference = _series(runs[base], "val_loss")
    for name, records in runs.items():
        train, valid = _series(records, "loss"), _series(records, "val_loss")
        train_axis.plot(list(train), _smooth(list(train.values()), 20),
                        label=name)
        valid_axis.plot(list(valid), list(valid.values()), marker="o",
                        label=name)
        shared = [step for step in valid if step in reference and step]
        ratio_axis.plot(shared, [100 * (valid[s] / reference[s] - 1)
                                 for s in shared], marker="o", label=name)
        print(f"{name}: {max(train)} steps")
    for name, records in list(runs.items())[1:]:
        result = compare(runs[base], records, args.window)
        first, last = result["logged"]
        for label, (ref, ours) in (
                (f"validation at step {result['step']}", result["val"]),
                (f"training, mean of steps {first}-{last}",
                 result["train"])):
            print(f"{name} vs {base}, {label}: {ours:.4f} vs {ref:.4f} "
                  f"({(ours - ref) / ref:+.3%} relative)")
    train_axis.set(title="training loss (moving mean of 20)", xlabel="step",
                   ylabel="loss")
    valid_axis.set(title="validation loss", xlabel="step")
    ratio_axis.set(title=f"validation loss against {base}'s", xlabel="step",
                   ylabel="difference (%)")
    for axis in (train_axis, valid_axis, ratio_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
