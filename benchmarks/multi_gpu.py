"""The `small` preset on one host's GPUs (issue 9): one GPU, then each
layout the GPU count allows, all with the same global batch and seed on
random tokens, under torchrun with NCCL.

It trains on one GPU twice (the second run's distance from the first is
the noise of bf16 and of the GPU's unordered sums), then each layout:
FSDP, tensor parallelism (TP), expert parallelism (EP) and pipeline
parallelism (PP 2, FSDP over the rest) over all the GPUs. For each it
prints the largest relative difference of the training loss from the
first single-GPU run over the steps, tokens/s (the median of the logged
steps after the first five), tokens/s per GPU and the scaling
efficiency (tokens/s over GPUs x the single GPU's); then a run saved
under EP halfway and resumed under PP, against the uninterrupted
single-GPU losses; and last it profiles one EP step
(benchmarks/profile_step.py) for the share of the all-to-alls. Logs and
metrics go under $OUT.

Run on the device machine from the repository root:

    python3 benchmarks/multi_gpu.py --gpus 2

--set adds settings to every run (train.compile=true, say), and --only
picks the runs: single, again, fsdp, tp, ep, pp, resume, profile.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(os.environ.get("OUT", "bench-out"))
RUNS = Path("/tmp/coom-multi-gpu")
# NVLink multicast stays off on the lent machines (their KINDS.md).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1", "OMP_NUM_THREADS": "4"}
# Each micro-batch of 2 x 4096 tokens; 4 of them a step on one GPU.
BATCH = ["train.micro_batch_size=2", "train.global_batch_size=8"]
STEPS = ("single", "again", "fsdp", "tp", "ep", "pp", "resume", "profile")


def _settings(steps: int) -> list[str]:
    return ["data.synthetic=true", f"train.steps={steps}", *BATCH,
            "schedule.lr_warmup_iters=2", f"train.eval_interval={steps}",
            "train.eval_iters=1", "logging.log_interval=1",
            "logging.tensorboard=false", "logging.progress_bar=false",
            "checkpoint.interval=1000"]


def _launch(name: str, gpus: int, arguments: list[str], timeout: int,
            script: tuple[str, ...] = ("-m", "coom")) -> bool:
    launcher = [sys.executable] if gpus == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={gpus}"]
    with open(OUT / f"{name}.log", "a") as log:
        try:
            result = subprocess.run([*launcher, *script, *arguments],
                                    stdout=log, stderr=subprocess.STDOUT,
                                    env=os.environ | NCCL_ENV,
                                    timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{name}: timed out after {timeout} s")
            return False
    if result.returncode:
        print(f"{name}: failed (exit {result.returncode}), see {name}.log")
    return result.returncode == 0


def _records(name: str) -> list[dict]:
    """The finished run's logged steps. Its metrics file is kept under
    $OUT, and the run deleted: each run saves its last step, 23 GB at
    `small`, and a few fill the disk."""
    path = RUNS / name / "metrics.jsonl"
    (OUT / f"{name}.metrics.jsonl").write_bytes(path.read_bytes())
    with open(path) as file:
        records = [record for record in map(json.loads, file)
                   if "loss" in record]
    shutil.rmtree(RUNS / name)
    return records


def _compare(label: str, gpus: int, ours: list[dict],
             single: list[dict]) -> None:
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"]
                for a, b in zip(ours, single))
    speed = statistics.median(r["tokens_per_s"] for r in ours[5:])
    base = statistics.median(r["tokens_per_s"] for r in single[5:])
    print(f"{label:28s} {len(ours):3d} steps, loss within {worst:.2e} of "
          f"1 GPU; {speed:9,.0f} tokens/s, {speed / gpus:9,.0f} per GPU, "
          f"scaling {speed / (gpus * base):.0%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=150,
                        help="seconds each launch may take")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides",
                        help="settings added to every run")
    parser.add_argument("--only", nargs="*", choices=STEPS,
                        default=list(STEPS))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(RUNS, ignore_errors=True)
    settings = _settings(args.steps) + args.overrides
    gpus = args.gpus

    def train(name, processes, *extra):
        return _launch(
            name, processes, ["train", args.recipe, "--run-dir",
                              str(RUNS / name), "--set", *settings,
                              *extra], args.timeout)

    if not train("single", 1):
        return
    single = _records("single")
    if "again" in args.only and train("again", 1):
        _compare("1 GPU again", 1, _records("again"), single)
    layouts = {"fsdp": [], "tp": [f"parallel.tensor={gpus}"],
               "ep": [f"parallel.expert={gpus}"],
               "pp": ["parallel.pipeline=2"]}
    for name, extra in layouts.items():
        if name in args.only and train(name, gpus, *extra):
            _compare(f"{name} x{gpus}", gpus, _records(name), single)
    half = args.steps // 2
    if "resume" in args.only and train(
            "resumed", gpus, f"parallel.expert={gpus}",
            f"train.exit_interval={half}"):
        resumed = _launch("resumed", gpus, [
            "train", "--resume", str(RUNS / "resumed"), "--set",
            "parallel.expert=1", "parallel.pipeline=2",
            "train.exit_interval=null"], args.timeout)
        if resumed:
            _compare(f"ep -> pp x{gpus} at step {half}", gpus,
                     _records("resumed"), single)
    if "profile" in args.only:
        profiled = _launch("profile-ep", gpus, [
            "--recipe", args.recipe, "--top", "12", "--set",
            f"parallel.expert={gpus}", *BATCH, *args.overrides],
            args.timeout, script=("benchmarks/profile_step.py",))
        if profiled:
            print((OUT / "profile-ep.log").read_text())


if __name__ == "__main__":
    main()
