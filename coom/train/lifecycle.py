"""A run's life: the trainers that train it one after another, and the
processes they share.

A trainer holds its model, its optimizer's moments and their process
groups. A growth (``coom.growth.schedule``) ends one; the next grows the
checkpoint and goes on. Each is dropped, and collected, before the next
is built, so that two models and their moments never share the memory;
the run's world leaves its process group after the last one is gone,
also when training fails (``World.close``).
"""
import gc
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from coom.config import RunConfig
from coom.train.run_dir import record_fp8_choices
from coom.train.trainer import Trainer


@dataclass
class Outcome:
    """How a run ended."""

    reason: str
    """"done", or why it stopped early (a signal, a budget, ...)."""

    step: int
    energy: str
    """The energy ledger's summary line."""

    main: bool
    """Whether this process is the run's first, which reports."""


class _Trainers:
    """The run's current trainer (``current``), which callers reach
    through this holder and never keep in a variable of their own: on
    leaving, the holder drops it, then closes the run's world."""

    def __init__(self, config: RunConfig, run_dir: Path):
        self.current = Trainer(config, run_dir)
        self.world = self.current.world

    def __enter__(self) -> "_Trainers":
        return self

    def __exit__(self, kind, error, frames) -> None:
        if error is not None:
            # The traceback's frames would keep the trainer alive
            # through the collection in world.close().
            traceback.clear_frames(frames)
        self.current = None
        self.world.close()


def _run(trainer: Trainer, run_dir: Path) -> str:
    """Train with trainer until it stops, having said which of its
    model's products run in FP8; why it stopped."""
    if trainer.world.main:
        record_fp8_choices(run_dir, trainer.parallel.fp8_choices)
    return trainer.run()


def train_run(config: RunConfig, run_dir: Path) -> Outcome:
    """Train config in run_dir through its growths."""
    with _Trainers(config, run_dir) as trainers:
        world = trainers.world
        started = trainers.current.energy.job_started
        if world.main:
            print(f"training in {run_dir}")
        reason = _run(trainers.current, run_dir)
        while reason == "growth":
            trainers.current = None
            gc.collect()
            trainers.current = Trainer(config, run_dir, world, started)
            reason = _run(trainers.current, run_dir)
        return Outcome(reason, trainers.current.step,
                       trainers.current.energy.summary(), world.main)


def evaluate_checkpoint(config: RunConfig, run_dir: Path,
                        path: Path) -> Optional[dict]:
    """The validation loss of the checkpoint at path, and each
    language's where the sources name languages (``Trainer.validation``),
    on the run's first process (None on the others)."""
    with _Trainers(config, run_dir) as trainers:
        trainers.current.restore(path)
        record = trainers.current.validation()
        return record if trainers.world.main else None
