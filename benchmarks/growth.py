"""Progressive growth against training from scratch: the compute a grown
model needs to reach the from-scratch model's final validation loss.

Usage: python3 benchmarks/growth.py RECIPE --out DIR --start "model.X=.."
--schedule "[{step: .., op: .., args: {..}}]" [--set ...] [--grown-set
...] [--name NAME ...] [--plot FILE]

It trains RECIPE (with --set) from scratch in DIR/scratch, and the same
recipe (plus --grown-set, e.g. more steps) from the smaller --start
model, grown by --schedule into the same final model, in DIR/NAME
(default grown); both see the same data in the same order. It then finds
the first evaluation at which the grown run's validation loss is at or
below the scratch run's final one, and prints the training FLOPs,
seconds and energy (where metered) each run spent to get there. --only
runs one of the two (several grown variants can share one scratch run)
or neither (analyse: then --name may list several grown runs, which the
plot draws together).
"""
import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (needs the backend first)

from coom.checkpoint.storage import (  # noqa: E402
    latest_checkpoint,
    read_train_state,
)
from coom.train.metrics import read_metrics  # noqa: E402


def _train(recipe: str, run_dir: Path, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "coom", "train", recipe, "--run-dir",
               str(run_dir), "--overwrite"]
    if overrides:
        command += ["--set", *overrides]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def _evaluations(run_dir: Path) -> list[dict]:
    """The records with a validation loss, after step 0."""
    return [record for record in read_metrics(run_dir)
            if "val_loss" in record and record["step"] > 0]


def _final_model(run_dir: Path) -> dict:
    state = read_train_state(latest_checkpoint(run_dir / "checkpoints"))
    return state["config"]["model"]


def _cost(record: dict) -> dict:
    return {"step": record["step"], "val_loss": record["val_loss"],
            "train_flops": record["train_flops"],
            "train_seconds": record["train_seconds"],
            "energy_kwh": record.get("energy_kwh")}


def analyse(out: Path, name: str) -> dict:
    scratch, grown = out / "scratch", out / name
    if _final_model(scratch) != _final_model(grown):
        raise SystemExit("the grown run ends in another model than the "
                         "scratch run; fix --start or --schedule")
    target = _evaluations(scratch)[-1]
    reached = next((record for record in _evaluations(grown)
                    if record["val_loss"] <= target["val_loss"]), None)
    result = {"target_val_loss": target["val_loss"],
              "scratch": _cost(target),
              "grown": None if reached is None else _cost(reached),
              "grown_final": _cost(_evaluations(grown)[-1])}
    if reached is not None:
        for key in ("train_flops", "train_seconds", "energy_kwh"):
            if target[key] and reached.get(key) is not None:
                result[f"saved_{key}"] = 1 - reached[key] / target[key]
    growth = [record for record in read_metrics(grown) if "growth" in record]
    result["growth"] = [{"step": r["step"], "ops": r["growth"]}
                        for r in growth]
    return result


def plot(out: Path, results: dict, path: Path) -> None:
    """Validation loss against training FLOPs: scratch and each grown run
    (results by folder name), a dotted line at each growth."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    runs = [("scratch", "from scratch")] + [
        (name, f"grown ({name})") for name in results]
    for run, label in runs:
        records = _evaluations(out / run)
        line, = axis.plot([r["train_flops"] for r in records],
                          [r["val_loss"] for r in records], marker="o",
                          markersize=3, label=label)
        for event in results.get(run, {}).get("growth", []):
            flops = next(r["train_flops"] for r in read_metrics(out / run)
                         if r["step"] == event["step"] and "train_flops" in r)
            axis.axvline(flops, color=line.get_color(), linestyle=":",
                         linewidth=1)
    target = next(iter(results.values()))["target_val_loss"]
    axis.axhline(target, color="gray", linewidth=0.8)
    axis.set(xlabel="training FLOPs", ylabel="validation loss",
             title="grown (dotted: growths) vs from scratch")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides",
                        help="overrides of both runs")
    parser.add_argument("--start", default="",
                        help="overrides of the grown run's first model")
    parser.add_argument("--schedule", default="[]",
                        help="the grown run's growth.schedule (YAML)")
    parser.add_argument("--grown-set", nargs="*", default=[],
                        help="overrides of the grown run only")
    parser.add_argument("--name", nargs="+", default=["grown"],
                        help="the grown run's folder in --out (several "
                        "for analyse)")
    parser.add_argument("--only", choices=["scratch", "grown", "analyse"])
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.only != "analyse" and len(args.name) != 1:
        parser.error("training a grown run takes one --name")
    if args.only in (None, "scratch"):
        _train(args.recipe, args.out / "scratch", args.overrides)
    if args.only in (None, "grown"):
        _train(args.recipe, args.out / args.name[0],
               args.overrides + args.grown_set + shlex.split(args.start)
               + [f"growth.schedule={args.schedule}"])
    if args.only not in (None, "analyse"):
        return
    results = {name: analyse(args.out, name) for name in args.name}
    text = json.dumps(results if len(results) > 1 else results[args.name[0]],
                      indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.plot:
        plot(args.out, results, args.plot)


if __name__ == "__main__":
    main()
