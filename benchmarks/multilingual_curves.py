"""Per-language validation of the multilingual recipe under two mixture
plans, and the plot docs/multilingual.md shows.

Trains ``tiny-multilingual`` (the machine's translated messages, about
96 languages) once per plan, each in its own run directory under OUT,
then plots docs/multilingual_bpb.png: each language's last validation
bits per byte against its training tokens, one colour per plan, and
the mean bits per byte of the smallest and largest fifth of the
languages over training. Prints the same figures. Runs on a CPU, from
the repository root:

    python3 benchmarks/multilingual_curves.py --out /tmp/curves \\
        --plot docs/multilingual_bpb.png

A finished run is reused; --set passes overrides to every run.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (needs the backend first)

from coom.train.metrics import read_metrics  # noqa: E402

PLANS = ("proportional", "unimax")


def train(run: Path, plan: str, overrides: list[str]) -> None:
    if (run / "metrics.jsonl").is_file() and any(
            "val_bpb/en" in record for record in read_metrics(run)
            if record["step"] > 0):
        return
    subprocess.run([sys.executable, "-m", "coom", "train",
                    "tiny-multilingual", "--run-dir", str(run),
                    "--overwrite", "--set", f"data.mixture={plan}",
                    "logging.progress_bar=false", *overrides], check=True)


def curves(run: Path) -> tuple[dict[str, int], dict[str, dict]]:
    """Each language's training tokens, and its bits per byte by step."""
    [phase] = json.loads((run / "mixture.json").read_text())["phases"]
    tokens = {language: share["tokens"]
              for language, share in phase["languages"].items()}
    bits = {language: {r["step"]: r[f"val_bpb/{language}"]
                       for r in read_metrics(run)
                       if f"val_bpb/{language}" in r}
            for language in tokens}
    return tokens, bits


def _fifths(tokens: dict[str, int]) -> dict[str, list[str]]:
    ordered = sorted(tokens, key=tokens.get)
    fifth = max(1, len(ordered) // 5)
    return {"smallest fifth": ordered[:fifth],
            "largest fifth": ordered[-fifth:]}


def _mean_curve(bits: dict[str, dict], languages: list[str]
                ) -> tuple[list[int], list[float]]:
    steps = sorted(bits[languages[0]])
    return steps, [statistics.fmean(bits[language][step]
                                    for language in languages)
                   for step in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = parser.parse_args()
    figure, (scatter, lines) = plt.subplots(1, 2, figsize=(12, 4.5))
    for plan, colour in zip(PLANS, ("tab:blue", "tab:orange")):
        run = args.out / plan
        train(run, plan, args.overrides)
        tokens, bits = curves(run)
        last = {language: series[max(series)]
                for language, series in bits.items()}
        scatter.scatter([tokens[language] for language in last],
                        list(last.values()), s=12, color=colour,
                        label=plan)
        print(f"{plan}: mean last bits per byte "
              f"{statistics.fmean(last.values()):.3f}")
        for (group, languages), style in zip(_fifths(tokens).items(),
                                             ("-", "--")):
            steps, mean = _mean_curve(bits, languages)
            lines.plot(steps, mean, style, color=colour,
                       label=f"{plan}, {group}")
            print(f"  {group} ({len(languages)} languages): "
                  + ", ".join(f"step {step} {value:.3f}"
                              for step, value in zip(steps, mean)))
    scatter.set(xscale="log", xlabel="language's training tokens",
                ylabel="validation bits per byte, last evaluation",
                title="Each language at the end")
    lines.set(xlabel="step", ylabel="mean validation bits per byte",
              title="Smallest and largest fifth of the languages")
    for axes in (scatter, lines):
        axes.legend(fontsize="small")
    figure.tight_layout()
    if args.plot:
        figure.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
