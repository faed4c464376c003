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


def train_run(config: RunConfig, run_dir: Path) -> Outcome:
    """Train config in run_dir through its growths."""
    trainer = Trainer(config, run_dir)
    world, started = trainer.world, trainer.energy.job_started
    try:
        if world.main:
            print(f"training in {run_dir}")
        reason = trainer.run()
        while reason == "growth":
            trainer = None
            gc.collect()
            trainer = Trainer(config, run_dir, world, started)
            reason = trainer.run()
        return Outcome(reason, trainer.step, trainer.energy.summary(),
                       world.main)
    except BaseException as error:
        # The traceback's frames would keep the trainer alive through
        # the collection in world.close().
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        trainer = None
        world.close()


def evaluate_checkpoint(config: RunConfig, run_dir: Path,
                        path: Path) -> Optional[float]:
    """The validation loss of the checkpoint at path, on the run's first
    process (None on the others)."""
    trainer = Trainer(config, run_dir)
    world = trainer.world
    try:
        trainer.restore(path)
        loss = trainer.evaluate(trainer.valid)
        return loss if world.main else None
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        trainer = None
        world.close()
