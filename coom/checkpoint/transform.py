"""A checkpoint transformed between two steps: loaded whole, changed, and
published beside it.

Growth (``coom.growth.schedule``) and expert rebalancing
(``coom.tools.rebalance``) change a run by changing its latest
checkpoint. The weights and optimizer state are loaded whole on the CPU
(whatever layout saved them), transformed, and saved as a checkpoint of
the same step, named with a suffix (``step_N-grown``,
``step_N-rebalanced``), which becomes the run's latest; a resume at any
layout reshards it. It is saved like every checkpoint, atomically, so a
transform stopped anywhere leaves the checkpoint it started from as the
latest.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from coom.checkpoint.storage import load_checkpoint, save_checkpoint


@dataclass
class Whole:
    """A checkpoint in one process, on the CPU, unsharded."""

    weights: dict
    """The model's tensors by parameter name."""

    optimizer: dict
    """The optimizer's state dict, by parameter name."""

    train_state: dict
    """The rest: step, config, data position, random generators."""


def transform_checkpoint(path: Path, transform: Callable[[Whole], None],
                         suffix: str, keep: int) -> Path:
    """Load the checkpoint at path whole, let transform change it in
    place, and publish the result beside path as the latest checkpoint,
    named as path's step plus suffix; the newest ``keep`` are kept.
    Every process of a run may call it with the same transform (DCP
    writes each tensor once)."""
    state = load_checkpoint(path)
    whole = Whole(state.pop("model"), state.pop("optimizer"), state)
    transform(whole)
    return save_checkpoint(
        path.parent, whole.train_state["step"],
        {"model": whole.weights, "optimizer": whole.optimizer},
        whole.train_state, keep, suffix=suffix)
