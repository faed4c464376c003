"""The hang watchdog: a step that takes longer than train.watchdog_minutes
(a process stuck in a collective, a dead file system) dumps this
process's Python stacks into the run directory and ends it with exit
code 1, for the scheduler or ``torchrun --max-restarts`` to start the
job again (``coom train --auto-resume``).

It is ``faulthandler.dump_traceback_later``, re-armed at every step: the
timer runs in a C thread, so it fires even where Python cannot run (a
collective waiting in C++). Each process keeps its own, so every stuck
process leaves its stacks. A dump goes to ``hangs/rankN-PID.txt``; the
file of a process that ends normally is removed.
"""
import contextlib
import faulthandler
import os
from pathlib import Path
from typing import IO, Optional

FOLDER = "hangs"


class Watchdog:
    """This process's watchdog over the training loop; off when minutes
    is None."""

    def __init__(self, run_dir: Path, rank: int, minutes: Optional[float]):
        self.seconds = None if minutes is None else minutes * 60
        self.path = run_dir / FOLDER / f"rank{rank}-{os.getpid()}.txt"
        self.header = (f"rank {rank}, process {os.getpid()}: a step took "
                       f"longer than {minutes} minutes "
                       "(train.watchdog_minutes); its Python stacks:\n")
        self.file: Optional[IO] = None

    def __enter__(self) -> "Watchdog":
        if self.seconds is not None:
            self.path.parent.mkdir(exist_ok=True)
            self.file = open(self.path, "w")
            self.file.write(self.header)
            self.file.flush()
        return self

    def step(self) -> None:
        """A step begins: the timer starts again."""
        if self.file is not None:
            faulthandler.dump_traceback_later(self.seconds, exit=True,
                                              file=self.file)

    def __exit__(self, *exc) -> None:
        if self.file is None:
            return
        faulthandler.cancel_dump_traceback_later()
        self.file.close()
        if self.path.stat().st_size == len(self.header.encode()):
            self.path.unlink()
            with contextlib.suppress(OSError):  # another's file is there
                self.path.parent.rmdir()
