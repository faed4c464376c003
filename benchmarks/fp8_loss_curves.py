"""Compare two training runs' losses (bf16 and FP8) and plot them.

Usage: python3 benchmarks/fp8_loss_curves.py BF16_RUN FP8_RUN --plot
docs/fp8_loss.png, where each run is a run directory (or a folder with
its metrics.jsonl). Prints the final validation losses, the mean
training loss over the last --window logged steps, and the relative
differences of FP8 against bf16.
"""
import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (needs the backend first)

from coom.train.metrics import read_metrics  # noqa: E402


def _series(records: list[dict], key: str):
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def _smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bf16", type=Path)
    parser.add_argument("fp8", type=Path)
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--window", type=int, default=100,
                        help="logged steps averaged for the final loss")
    args = parser.parse_args()
    runs = {"bf16": read_metrics(args.bf16), "fp8": read_metrics(args.fp8)}
    figure, (train_axis, valid_axis) = plt.subplots(1, 2, figsize=(11, 4))
    final = {}
    for name, records in runs.items():
        steps, losses = _series(records, "loss")
        valid_steps, valid = _series(records, "val_loss")
        final[name] = (statistics.fmean(losses[-args.window:]), valid[-1])
        train_axis.plot(steps, _smooth(losses, 20), label=name)
        valid_axis.plot(valid_steps, valid, marker="o", label=name)
        print(f"{name}: {steps[-1]} steps, training loss (mean of last "
              f"{args.window} logged) {final[name][0]:.4f}, final "
              f"validation loss {final[name][1]:.4f}")
    for index, label in enumerate(["training", "validation"]):
        bf16, fp8 = final["bf16"][index], final["fp8"][index]
        print(f"{label}: FP8 - bf16 = {fp8 - bf16:+.4f} "
              f"({(fp8 - bf16) / bf16:+.3%} relative)")
    train_axis.set(title="training loss (moving mean of 20)", xlabel="step",
                   ylabel="loss")
    valid_axis.set(title="validation loss", xlabel="step")
    for axis in (train_axis, valid_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
