"""Atomic checkpoints: a crash at any moment leaves the last one loadable.

A checkpoint is a folder ``step_NNNNNNN`` under the run's checkpoints
folder. It is written as ``.tmp-step_NNNNNNN``, every file and the folder
are fsynced, then it is renamed into place, and only then does the
``latest`` pointer (itself replaced atomically) move to it. Older
checkpoints beyond the ones kept are deleted after the pointer has moved.
A process killed at any point therefore leaves either the old pointer and
old checkpoint, or the new ones; leftover temporary folders are ignored
and cleaned up by the next save.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from coom.errors import UserError

LATEST = "latest"
STATE = "state.pt"
PREFIX = "step_"


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_pointer(folder: Path, name: str) -> None:
    temporary = folder / f".{LATEST}.tmp"
    temporary.write_text(name + "\n")
    _fsync(temporary)
    os.replace(temporary, folder / LATEST)
    _fsync(folder)


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write state as the checkpoint of step and keep the newest ``keep``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{step:07d}"
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    temporary = folder / f".tmp-{name}"
    temporary.mkdir()
    torch.save(state, temporary / STATE)
    meta = {"step": step, "files": [STATE]}
    (temporary / "meta.json").write_text(json.dumps(meta))
    for path in temporary.iterdir():
        _fsync(path)
    _fsync(temporary)
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(temporary, final)
    _fsync(folder)
    _write_pointer(folder, name)
    for old in sorted(folder.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The checkpoint the ``latest`` pointer names, or None before any."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise UserError(f"{pointer} names {path}, which holds no {STATE}; "
                        "the checkpoint folder was changed by hand")
    return path


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint's state onto the CPU."""
    try:
        return torch.load(path / STATE, map_location="cpu",
                          weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read checkpoint {path / STATE}: "
                        f"{str(error).splitlines()[0]}") from None
