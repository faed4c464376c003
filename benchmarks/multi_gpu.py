"""A preset on one host's GPUs (issue 32): one GPU, then each layout the
GPU count allows, all with the same global batch and seed on random
tokens, under torchrun with NCCL, each against coom plan's prediction.

It trains on one GPU twice: the second run's distance from the first is
the run-to-run spread of bf16 and of the GPU's unordered sums, which
every layout's losses must stay within. Then each layout over all the
GPUs: FSDP; HSDP (2 replicas of FSDP over half the GPUs, from 4 GPUs);
tensor parallelism 2 (TP), expert parallelism over every GPU (EP) and
pipeline parallelism 2 (PP), each with FSDP over the rest; and the
fastest layout other than plain FSDP that `coom plan --search` proposes
for the same global batch ("planned"). For each it prints the largest
relative difference of the training loss from the first single-GPU run
over the steps, against the spread; tokens/s (the median of the logged
steps after the first five) and the scaling efficiency (tokens/s over
GPUs x the single GPU's); and the most memory any process held
allocated after the first five steps (metrics.jsonl's max_memory_gib)
and the step time, each against coom plan's; each figure says whether
it meets issue 32's target (FSDP's scaling at least 90%, EP's 75%; the
plan within 10% of the memory and 20% of the step time). Then a run
saved under EP halfway and resumed under PP, against the uninterrupted
single-GPU losses; and last it profiles one EP step
(benchmarks/profile_step.py) for the share of the all-to-alls. Logs and
metrics go under $OUT.

Run on the device machine from the repository root:

    python3 benchmarks/multi_gpu.py --gpus 2

--set adds settings to every run (fp8.recipe=blockwise, say), --recipe
picks the preset (medium, for FP8's), and --only picks the runs:
single, again, fsdp, hsdp, tp, ep, pp, planned, resume, profile.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from coom.config import load_config
from coom.plan.gpus import gpu_named, kind_of
from coom.plan.plan import make_plan
from coom.plan.ranks import as_on_gpu
from coom.plan.search import search

OUT = Path(os.environ.get("OUT", "bench-out"))
RUNS = Path("/tmp/coom-multi-gpu")
# NVLink multicast stays off on the lent machines (their KINDS.md).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1", "OMP_NUM_THREADS": "4"}
STEPS = ("single", "again", "fsdp", "hsdp", "tp", "ep", "pp", "planned",
         "resume", "profile")
SKIPPED = 5
"""Logged steps left out of speed and memory: compilation and
warm-up."""
TARGETS = {"fsdp": 0.9, "ep": 0.75}
"""Issue 32's scaling targets."""
MEMORY_BOUND, STEP_BOUND = 0.1, 0.2
"""How far coom plan's peak memory and step time may fall from the
measured ones (issue 32)."""


def _batch(gpus: int) -> list[str]:
    """Micro-batches of 2 x the preset's sequence; a global batch of at
    least 4 of them, and one for each GPU."""
    return ["train.micro_batch_size=2",
            f"train.global_batch_size={2 * max(4, gpus)}"]


def _settings(steps: int, gpus: int) -> list[str]:
    return ["data.synthetic=true", f"train.steps={steps}", *_batch(gpus),
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


def _loss_distance(ours: list[dict], single: list[dict]) -> float:
    return max(abs(a["loss"] - b["loss"]) / b["loss"]
               for a, b in zip(ours, single))


def _speed(records: list[dict]) -> float:
    return statistics.median(r["tokens_per_s"] for r in records[SKIPPED:])


class Planner:
    """coom plan's memory and step time of the runs' settings, on the
    GPU kind the runs use (or the one named, on a machine without)."""

    def __init__(self, recipe: str, gpu: str):
        self.recipe, self.gpu = recipe, gpu_named(gpu)

    def config(self, overrides: list[str]):
        return as_on_gpu(load_config(self.recipe, overrides),
                         self.gpu.memory)

    def predict(self, overrides: list[str], gpus: int):
        """The plan of the run with overrides on gpus."""
        return make_plan(self.config(overrides), gpus, self.gpu)

    def layout(self, overrides: list[str], gpus: int):
        """The fastest proposal of ``coom plan --search`` other than
        plain FSDP, as overrides of the run's; None if it has none."""
        found = search(self.config(overrides), gpus, self.gpu,
                       show_progress=False)
        return next((list(candidate.overrides) for candidate in found
                     if any(override.startswith("parallel.")
                            for override in candidate.overrides)), None)


def _within(planned: float, measured: float, bound: float) -> str:
    """planned / measured, and whether it is within bound of 1."""
    ratio = planned / measured
    verdict = "within" if abs(ratio - 1) <= bound else "OUTSIDE"
    return f"planned / measured {ratio:.2f}, {verdict} {bound:.0%}"


def _compare(label: str, gpus: int, ours: list[dict], single: list[dict],
             spread: float, plan, target: Optional[float] = None
             ) -> None:
    distance = _loss_distance(ours, single)
    within = "" if spread is None else (
        " (within the spread)" if distance <= spread
        else f" (OUTSIDE the spread {spread:.2e})")
    speed, base = _speed(ours), _speed(single)
    scaling = speed / (gpus * base)
    aim = "" if target is None else (
        f" ({'meets' if scaling >= target else 'MISSES'} {target:.0%})")
    print(f"{label:28s} {len(ours):3d} steps, loss within {distance:.2e} "
          f"of 1 GPU{within}; {speed:9,.0f} tokens/s, {speed / gpus:9,.0f} "
          f"per GPU, scaling {scaling:.0%}{aim}", flush=True)
    if plan is None:
        return
    tokens = plan.time.tokens_per_second
    # Step times: planned / measured is the measured over the planned
    # tokens/s.
    line = (f"{'':28s} plan: {tokens:9,.0f} tokens/s (step time "
            f"{_within(speed, tokens, STEP_BOUND)})")
    held = [r["max_memory_gib"] for r in ours[SKIPPED:]
            if "max_memory_gib" in r]
    if held:
        planned = plan.fullest.peak / 2 ** 30
        line += (f"; memory {max(held):.1f} GiB against {planned:.1f} "
                 f"planned ({_within(planned, max(held), MEMORY_BOUND)})")
    print(line, flush=True)


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
    parser.add_argument("--gpu", default=None,
                        help="the GPU kind coom plan predicts for "
                             "(default: the one torch sees)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(RUNS, ignore_errors=True)
    settings = _settings(args.steps, args.gpus) + args.overrides
    gpus, planner = args.gpus, Planner(args.recipe, args.gpu or _gpu_kind())

    def train(name, processes, *extra):
        return _launch(
            name, processes, ["train", args.recipe, "--run-dir",
                              str(RUNS / name), "--set", *settings,
                              *extra], args.timeout)

    if not train("single", 1):
        return
    single, spread = _records("single"), None
    if "again" in args.only and train("again", 1):
        again = _records("again")
        spread = _loss_distance(again, single)
        _compare("1 GPU again", 1, again, single, None,
                 planner.predict(settings, 1))
    for name, extra in _layouts(args.only, gpus, planner, settings):
        if train(name, gpus, *extra):
            _compare(f"{name} x{gpus} {' '.join(extra)}", gpus,
                     _records(name), single, spread,
                     planner.predict(settings + extra, gpus),
                     TARGETS.get(name))
    _resume_and_profile(args, settings, single, spread)


def _gpu_kind() -> str:
    """The planner's name of the GPU torch sees."""
    found = torch.cuda.get_device_name()
    kind = kind_of(found)
    if kind is None:
        raise SystemExit(f"coom plan knows no {found}; name one with --gpu")
    return kind


def _layouts(only: list[str], gpus: int, planner: Planner,
             settings: list[str]):
    """(name, overrides) of the layouts asked for that gpus allow."""
    layouts = {"fsdp": [], "tp": ["parallel.tensor=2"],
               "ep": [f"parallel.expert={gpus}"],
               "pp": ["parallel.pipeline=2"]}
    if gpus >= 4:
        layouts["hsdp"] = ["parallel.data_parallel_replicate=2"]
    if "planned" in only:
        layouts["planned"] = planner.layout(settings, gpus)
        if layouts["planned"] is None:
            print("planned: coom plan --search proposes plain FSDP alone")
            del layouts["planned"]
    return [(name, extra) for name, extra in layouts.items()
            if name in only]


def _resume_and_profile(args, settings: list[str], single: list[dict],
                        spread) -> None:
    """EP saved halfway, resumed under PP; a profiled EP step."""
    gpus, half = args.gpus, args.steps // 2
    if "resume" in args.only and _launch(
            "resumed", gpus, ["train", args.recipe, "--run-dir",
                              str(RUNS / "resumed"), "--set", *settings,
                              f"parallel.expert={gpus}",
                              f"train.exit_interval={half}"], args.timeout):
        resumed = _launch("resumed", gpus, [
            "train", "--resume", str(RUNS / "resumed"), "--set",
            "parallel.expert=1", "parallel.pipeline=2",
            "train.exit_interval=null"], args.timeout)
        if resumed:
            _compare(f"ep -> pp x{gpus} at step {half}", gpus,
                     _records("resumed"), single, spread, None)
    if "profile" in args.only:
        profiled = _launch("profile-ep", gpus, [
            "--recipe", args.recipe, "--top", "12", "--set",
            f"parallel.expert={gpus}", *_batch(gpus), *args.overrides],
            args.timeout, script=("benchmarks/profile_step.py",))
        if profiled:
            print((OUT / "profile-ep.log").read_text())


if __name__ == "__main__":
    main()
