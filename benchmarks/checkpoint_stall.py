"""How long a checkpoint stops training: a checkpoint written at once
against one written in the background (``checkpoint.background``).

Builds the trainer of `coom bench` (random tokens), runs warm-up steps,
then for each mode: times the steps alone, saves a checkpoint, and
times the steps that follow until the background write is published.
The stall is the save call's time plus what those steps took beyond
their usual time. Prints both, and the checkpoint's size. The background
mode runs twice: its first save makes the CPU memory it copies into
(pinned, on a GPU), the next reuses it. Run on the
device machine from the repository root:

    python3 benchmarks/checkpoint_stall.py --set train.compile=true

Each checkpoint goes to a temporary folder removed afterwards; `small`
with its optimizer moments takes some 23 GB of disk.
"""
import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from coom.config import load_config
from coom.tools.bench import bench_config
from coom.train.trainer import Trainer


def _drain() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _steps(trainer: Trainer, count: int) -> float:
    """Seconds count steps take, the device drained."""
    _drain()
    started = time.perf_counter()
    for _ in range(count):
        trainer.train_step()
    _drain()
    return time.perf_counter() - started


def stall(trainer: Trainer, background: bool, steps: int) -> dict:
    """The save's figures in one mode."""
    trainer.checkpoints.config = replace(trainer.checkpoints.config,
                                         background=background)
    usual = _steps(trainer, steps) / steps
    _drain()
    started = time.perf_counter()
    trainer.save()
    _drain()
    call = time.perf_counter() - started
    after, taken = 0, 0.0
    while trainer.checkpoints.pending is not None:
        taken += _steps(trainer, 1)
        after += 1
        trainer.checkpoints.finish(unless_writing=True)
    folder = trainer.checkpoints.folder
    size = sum(path.stat().st_size for path in folder.rglob("*")
               if path.is_file())
    shutil.rmtree(folder)
    return {"step_s": usual, "call_s": call, "steps_after": after,
            "extra_s": taken - after * usual,
            "stall_s": call + taken - after * usual, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.recipe, args.overrides)
    config = bench_config(config, steps=1000, warmup=args.warmup,
                          real_data=False)
    config = replace(config, checkpoint=replace(config.checkpoint, keep=1))
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, Path(folder))
        _steps(trainer, args.warmup)
        modes = {"at once": False, "background, first": True,
                 "background, next": True}
        for mode, background in modes.items():
            figures = stall(trainer, background, args.steps)
            print(f"{mode:>17}: "
                  f"stall {figures['stall_s']:.2f} s (save call "
                  f"{figures['call_s']:.2f} s, {figures['steps_after']} "
                  f"steps after it {figures['extra_s']:+.2f} s beyond "
                  f"their usual {figures['step_s']:.3f} s each), "
                  f"checkpoint {figures['bytes'] / 1e9:.1f} GB",
                  flush=True)


if __name__ == "__main__":
    main()
