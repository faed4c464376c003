"""FP8 against bf16 over a long run of the `small` preset: three runs of
the same seed and data (bf16, FP8 blockwise, bf16 with PyTorch's kernels
for the spread between two bf16 runs), one after another, each resumed
where it stopped. One device call holds about 8 minutes of a run, so
each call starts or resumes the unfinished runs within its --minutes and
stops them with a checkpoint (``train.exit_duration_in_mins``); the next
call, on the same machine (the runs live in --out), goes on.

The default corpus (the Python standard library, about 10M tokens) is
smaller than a run of 2,000 steps at batch 4 x 4096 (33M tokens), which
then learns it by heart. ``--corpus DIR ...`` trains on every .py file
under the given folders instead (the device's torch environment and
/usr/lib/python3/dist-packages: 25,866 files, 396 MB of text), written
once as OUT/corpus/python.jsonl, one document per file.

``--runs`` picks some of the runs (the three by default; RUNS lists
more), for instance to add runs beside one kept from an earlier
machine: the corpus, written in a fixed order, and the tokenizer trained
on it come out the same.

The script copies each run's metrics.jsonl to --metrics (as
NAME/metrics.jsonl, a folder fp8_loss_curves.py takes as a run) after
every run, so what a call leaves behind is kept where the runs are lost
with the machine. A run is resumed whenever OUT/NAME holds one: --steps,
--batch, --accumulate and --eval-interval apply only when a run
starts, so runs of other settings need another --out.

Usage: python3 benchmarks/fp8_loss_runs.py [--out /dev/shm] [--steps 2000]
[--batch 4] [--accumulate 1] [--eval-interval 100] [--minutes 9.2]
[--corpus DIR ...] [--runs NAME ...] [--seeds N ...] [--set K=V ...]
[--metrics DIR]; then
``python3 benchmarks/fp8_loss_curves.py OUT/bf16 OUT/fp8 --spread
OUT/bf16k --plot PLOT``.
"""
import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from coom.train.metrics import read_metrics

FP8 = ["fp8.recipe=blockwise", "fp8.filter=false"]
RUNS = {"bf16": [], "fp8": FP8,
        "bf16k": ["train.kernels=false"],
        "bf16-again": [],
        "fp8-bf16-experts": [*FP8, "fp8.experts=false"],
        "bf16-moments": ["optimizer.moments_dtype=bf16"],
        "float32-moments": ["optimizer.moments_dtype=float32"]}
"""The runs by name: the three of the comparison, then a repeat of bf16
(how far one configuration drifts from itself, where the GPU's sums are
not deterministic), FP8 with the routed experts left in bf16, and bf16
with AdamW's moments stored in bf16 (DeepSeek-V3's, the default on GPUs
since session 27) and in float32, to compare the two by the same
protocol. FP8
runs every product it can (no filter): the protocol tests FP8's
numerics, not the filter's choice."""
DEFAULT_RUNS = ["bf16", "fp8", "bf16k"]
SAVE_MARGIN_S = 75
"""Time a run needs after its budget to finish its step and save."""


def _last_step(run_dir: Path) -> int:
    if not (run_dir / "metrics.jsonl").is_file():
        return 0
    return max((record["step"] for record in read_metrics(run_dir)),
               default=0)


def _copy_metrics(run_dir: Path, folder, name: str) -> None:
    """run_dir's metrics.jsonl to folder/NAME/metrics.jsonl (a folder
    that fp8_loss_curves.py reads as a run), if both exist."""
    if folder is not None and (run_dir / "metrics.jsonl").is_file():
        (folder / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "metrics.jsonl",
                        folder / name / "metrics.jsonl")


def write_corpus(folders: list[Path], out: Path) -> Path:
    """Every .py file under folders as one .jsonl document each, in an
    order fixed by a hash of its path (so validation samples the whole);
    kept once written."""
    corpus = out / "corpus"
    if (corpus / "python.jsonl").is_file():
        return corpus
    corpus.mkdir(parents=True, exist_ok=True)
    files = sorted({path.resolve() for folder in folders
                    for path in folder.rglob("*.py") if path.is_file()},
                   key=lambda path: hashlib.sha256(
                       str(path).encode()).hexdigest())
    partial = corpus / "python.jsonl.tmp"
    written = 0
    with open(partial, "w") as file:
        for path in files:
            text = path.read_bytes().decode("utf-8", errors="replace")
            if text.strip():
                file.write(json.dumps({"text": text}) + "\n")
                written += len(text)
    partial.rename(corpus / "python.jsonl")
    print(f"corpus: {len(files)} files, {written / 1e6:.0f} MB of text",
          flush=True)
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=4,
                        help="sequences per micro-batch")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="micro-batches per step")
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=9.2,
                        help="this call's time for all runs")
    parser.add_argument("--corpus", type=Path, nargs="+",
                        help="train on the .py files under these folders "
                        "instead of the default corpus")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS),
                        default=DEFAULT_RUNS)
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="train.seed of the runs (initialisation and "
                        "data order): every run of --runs for each seed "
                        "in turn, named NAME-seedSEED")
    parser.add_argument("--set", nargs="+", default=[], dest="overrides",
                        help="more settings of every run when it starts, "
                        "for instance model.num_layers=4")
    parser.add_argument("--metrics", type=Path,
                        help="copy each run's metrics.jsonl here, as "
                        "NAME/metrics.jsonl")
    args = parser.parse_args()
    deadline = time.monotonic() + 60 * args.minutes
    data = []
    if args.corpus:
        corpus = write_corpus(args.corpus, args.out)
        data = [f"data.paths=[{corpus}]", "data.num_workers=12",
                f"data.cache_dir={args.out / 'cache'}"]
    common = [f"train.steps={args.steps}",
              f"train.micro_batch_size={args.batch}",
              f"train.global_batch_size={args.batch * args.accumulate}",
              "train.compile=true",
              f"train.eval_interval={args.eval_interval}",
              "logging.log_interval=5", "logging.progress_bar=false",
              "logging.tensorboard=false", "checkpoint.interval=100000",
              "checkpoint.keep=1", *data, *args.overrides]
    for seed in args.seeds or [None]:
        if not _run_seed(args, seed, common, deadline):
            break


def _run_seed(args: argparse.Namespace, seed, common: list[str],
              deadline: float) -> bool:
    """Start or resume every run of args.runs with train.seed seed (the
    recipe's if None) until deadline; False once out of time."""
    if seed is not None:
        common = [*common, f"train.seed={seed}"]
    for run in args.runs:
        name = run if seed is None else f"{run}-seed{seed}"
        extra, run_dir = RUNS[run], args.out / name
        if _last_step(run_dir) == args.steps:
            print(f"{name}: done", flush=True)
            _copy_metrics(run_dir, args.metrics, name)
            continue
        left = deadline - time.monotonic() - SAVE_MARGIN_S
        if left < 60:
            print(f"{name}: not started, {left:.0f} s left", flush=True)
            return False
        budget = f"train.exit_duration_in_mins={left / 60:.2f}"
        if (run_dir / "config.yaml").is_file():
            command = ["--resume", str(run_dir), "--set", budget]
        else:
            command = ["small", "--run-dir", str(run_dir), "--set",
                       *common, *extra, budget]
        print(f"{name}: from step {_last_step(run_dir)}", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "coom", "train",
                            *command], check=True)
        finally:
            _copy_metrics(run_dir, args.metrics, name)
        print(f"{name}: at step {_last_step(run_dir)}", flush=True)
    return True


if __name__ == "__main__":
    main()
