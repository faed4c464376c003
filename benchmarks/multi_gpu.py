"""The `small` preset on one host's GPUs (issue 9): one GPU, then each
layout the GPU count allows, all with the same global batch and seed on
random tokens, under torchrun with NCCL.

For each layout it prints the largest relative difference of the
training loss from the single GPU's over the run's steps, tokens/s (the
median of the logged steps after the first five), tokens/s per GPU and
the scaling efficiency (tokens/s over GPUs x the single GPU's); then a
run saved by FSDP halfway and resumed with tensor parallelism, against
the uninterrupted single-GPU losses. Logs and metrics go under $OUT.

Run on the device machine from the repository root:

    python3 benchmarks/multi_gpu.py --gpus 2
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(os.environ.get("OUT", "bench-out"))
# NVLink multicast stays off on the lent machines (their KINDS.md).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1", "OMP_NUM_THREADS": "4"}


def _settings(steps: int) -> list[str]:
    return ["data.synthetic=true", f"train.steps={steps}",
            "train.micro_batch_size=2", "train.global_batch_size=8",
            "schedule.lr_warmup_iters=2", f"train.eval_interval={steps}",
            "train.eval_iters=1", "logging.log_interval=1",
            "logging.tensorboard=false", "logging.progress_bar=false",
            "checkpoint.interval=1000"]


def _launch(name: str, gpus: int, arguments: list[str],
            timeout: int) -> bool:
    launcher = [sys.executable, "-m", "coom"] if gpus == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={gpus}", "-m", "coom"]
    with open(OUT / f"{name}.log", "a") as log:
        try:
            result = subprocess.run([*launcher, *arguments], stdout=log,
                                    stderr=subprocess.STDOUT,
                                    env=os.environ | NCCL_ENV,
                                    timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{name}: timed out after {timeout} s")
            return False
    if result.returncode:
        print(f"{name}: failed (exit {result.returncode}), see {name}.log")
    return result.returncode == 0


def _records(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as file:
        return [record for record in map(json.loads, file)
                if "loss" in record]


def _compare(name: str, gpus: int, ours: list[dict],
             single: list[dict]) -> None:
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"]
                for a, b in zip(ours, single))
    speed = statistics.median(r["tokens_per_s"] for r in ours[5:])
    base = statistics.median(r["tokens_per_s"] for r in single[5:])
    print(f"{name:28s} {len(ours):3d} steps, loss within {worst:.2e} of "
          f"1 GPU; {speed:9,.0f} tokens/s, {speed / gpus:9,.0f} per GPU, "
          f"scaling {speed / (gpus * base):.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=150)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    settings = _settings(args.steps)
    runs = Path("/tmp/coom-multi-gpu")

    def train(name, gpus, *extra):
        return _launch(name, gpus, ["train", "small", "--run-dir",
                                    str(runs / name), "--set", *settings,
                                    *extra], args.timeout)

    if not train("single", 1):
        return
    single = _records(runs / "single")
    layouts = {"fsdp": [], "tp": [f"parallel.tensor={args.gpus}"],
               "ep": [f"parallel.expert={args.gpus}"]}
    for name, extra in layouts.items():
        if train(name, args.gpus, *extra):
            _compare(f"{name} x{args.gpus}", args.gpus,
                     _records(runs / name), single)
    half = args.steps // 2
    if train("resumed", args.gpus, f"train.exit_interval={half}"):
        resumed = _launch("resumed", args.gpus, [
            "train", "--resume", str(runs / "resumed"), "--set",
            f"parallel.tensor={args.gpus}", "train.exit_interval=null"],
            args.timeout)
        if resumed:
            _compare(f"fsdp -> tp x{args.gpus} at step {half}", args.gpus,
                     _records(runs / "resumed"), single)
    for path in runs.glob("*/metrics.jsonl"):
        (OUT / f"{path.parent.name}.metrics.jsonl").write_bytes(
            path.read_bytes())


if __name__ == "__main__":
    main()
