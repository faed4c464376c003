"""The run's checkpoints as the trainer writes them: at once, or with
checkpoint.background in the background, published once written
(``coom.checkpoint.storage``)."""
from pathlib import Path
from typing import Optional

import torch

from coom.checkpoint.staging import KeptBuffers
from coom.checkpoint.storage import BackgroundSave, save_checkpoint
from coom.config.output import CheckpointConfig
from coom.parallel.mesh import World


class RunCheckpoints:
    """Writes the checkpoints of a run directory.

    Args:
        folder: the run's checkpoints folder.
        config: the checkpoint section.
        world: the run's processes, which all call every method at the
            same step.
    """

    def __init__(self, folder: Path, config: CheckpointConfig,
                 world: World):
        self.folder, self.config, self.world = folder, config, world
        self.pending: Optional[BackgroundSave] = None
        """The checkpoint being written in the background."""
        self.group = None
        """The processes' group for background writes, made at the
        first: its collectives must not meet the training's."""
        self.stager = None
        """The CPU memory background writes copy the tensors into, made
        at the first and kept for the next."""

    def save(self, step: int, tensors: dict, train_state: dict,
             ending: bool) -> None:
        """Write the checkpoint of step: in the background with
        checkpoint.background, unless the run ends after it. The one
        still being written is published first."""
        self.finish()
        if not self.config.background or ending:
            save_checkpoint(self.folder, step, tensors, train_state,
                            self.config.keep)
            return
        if self.group is None and self.world.size > 1:
            self.group = torch.distributed.new_group(backend="gloo")
        if self.stager is None:
            self.stager = KeptBuffers()
        self.pending = BackgroundSave(self.folder, step, tensors,
                                      train_state, self.config.keep,
                                      self.stager, self.group)

    def finish(self, unless_writing: bool = False) -> None:
        """Publish the checkpoint written in the background, if any; with
        unless_writing, only once every process has written its part."""
        if self.pending is None or (unless_writing and self.world.any(
                not self.pending.done())):
            return
        pending, self.pending = self.pending, None
        pending.finish()
