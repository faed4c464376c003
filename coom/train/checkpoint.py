"""Atomic, sharded checkpoints: a crash at any moment leaves the last one
loadable, and a run saved at one layout resumes at another.

A checkpoint is a folder ``step_NNNNNNN`` under the run's checkpoints
folder, holding:

- the tensors (weights, optimizer moments) in PyTorch's distributed
  checkpoint format (DCP: ``.metadata`` and ``__R_0.distcp`` files):
  each process writes its own shards, and loading reshards them to
  whatever layout the reader has;
- ``train_state.pt``: the rest (step, samples consumed, random
  generators, config), written by the first process;
- ``meta.json``, written last: a folder without it is not a checkpoint.

It is written as ``.tmp-step_NNNNNNN``, every file and the folder are
fsynced, then it is renamed into place, and only then does the
``latest`` pointer (itself replaced atomically) move to it. Older
checkpoints beyond the ones kept are deleted after the pointer has moved.
A process killed at any point therefore leaves either the old pointer and
old checkpoint, or the new ones; leftover temporary folders are ignored
and cleaned up by the next save.

Under torchrun every process calls ``save_checkpoint`` and
``load_sharded``; the folder must be one all processes see (one machine,
or a shared file system).
"""
import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import (
    _load_state_dict_from_keys,
)

from coom.errors import UserError

# DCP's errors derive from BaseException, not Exception.
_READ_ERRORS = (Exception, dcp.CheckpointException)
LATEST = "latest"
TRAIN_STATE = "train_state.pt"
META = "meta.json"
PREFIX = "step_"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _main() -> bool:
    return not _distributed() or dist.get_rank() == 0


@contextlib.contextmanager
def _quiet_in_one_process():
    """DCP warns each time it runs without a process group; one process
    is the intent then."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "torch.distributed is (disabled|unavailable)")
        yield


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


def _on_first_process(work) -> None:
    """Run work on the first process, in place of a barrier: every
    process learns whether it failed, so that none waits for ever on a
    process that stopped with an error (disk full, permissions)."""
    error = None
    if _main():
        try:
            work()
        except Exception as caught:
            error = caught
    if _distributed():
        outcome = [None if error is None
                   else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None and error is None:
            raise UserError(f"saving the checkpoint failed on the first "
                            f"process: {outcome[0]}")
    if error is not None:
        raise error


def write_checkpoint_folder(folder: Path, tensors: dict,
                            train_state: dict) -> None:
    """Write a checkpoint's files into the existing folder: tensors with
    DCP (every process, collectively), then, by the first process,
    train_state and ``meta.json``, each file fsynced. tensors' values may
    be sharded (DTensors)."""
    with _quiet_in_one_process():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(folder))

    def write_the_rest():
        torch.save(train_state, folder / TRAIN_STATE)
        meta = {"step": train_state.get("step"),
                "tensors": sorted(tensors), "format": "torch.distributed"
                ".checkpoint, plus train_state.pt"}
        (folder / META).write_text(json.dumps(meta))
        for path in folder.iterdir():
            _fsync(path)
        _fsync(folder)
    _on_first_process(write_the_rest)


def save_checkpoint(folder: Path, step: int, tensors: dict,
                    train_state: dict, keep: int, suffix: str = "") -> Path:
    """Write the checkpoint of step (named ``step_NNNNNNN`` plus suffix)
    and keep the newest ``keep``. Every process calls it; only the first
    one's train_state is written."""
    name = f"{PREFIX}{step:07d}{suffix}"
    temporary, final = folder / f".tmp-{name}", folder / name

    def prepare():
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        temporary.mkdir()

    def publish():
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
        _fsync(folder)
        _write_pointer(folder, name)
        for old in sorted(folder.glob(f"{PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _on_first_process(prepare)
    write_checkpoint_folder(temporary, tensors, train_state)
    _on_first_process(publish)
    return final


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The checkpoint the ``latest`` pointer names, or None before any."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    if not (path / META).is_file():
        raise UserError(f"{pointer} names {path}, which holds no complete "
                        f"checkpoint (no {META}); the checkpoint folder was "
                        "changed by hand")
    return path


def is_checkpoint(folder: Path) -> bool:
    return (folder / META).is_file()


def _unreadable(path: Path, error: BaseException) -> UserError:
    if isinstance(error, dcp.CheckpointException) and error.failures:
        # The first failing process's (exception, traceback), rather than
        # the list of ranks.
        error, _ = next(iter(error.failures.values()))
    return UserError(f"cannot read checkpoint {path}: "
                     f"{str(error).splitlines()[0]}")


def read_train_state(path: Path) -> dict:
    """A checkpoint's train_state (everything but the tensors)."""
    try:
        return torch.load(path / TRAIN_STATE, map_location="cpu",
                          weights_only=True)
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The whole (unsharded) shape of each tensor in a checkpoint, by its
    flattened name (``model.<parameter name>``, ...)."""
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from None
    return {name: tuple(item.size)
            for name, item in metadata.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)}


def load_sharded(path: Path, tensors: dict) -> None:
    """Fill tensors (a state dict laid out as this process holds it,
    sharded or not) from a checkpoint, in place; every process calls it.
    """
    tensor_shapes(path)  # a damaged index fails here, plainly
    try:
        with _quiet_in_one_process():
            dcp.load(tensors, storage_reader=dcp.FileSystemReader(path))
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from None


def load_checkpoint(path: Path, keys: Optional[set[str]] = None) -> dict:
    """A whole checkpoint in one process, on the CPU, unsharded: its
    train_state's entries plus its tensors (``model``, ``optimizer``), or
    only those named (``{"model"}`` for the weights alone)."""
    state = read_train_state(path)
    tensor_shapes(path)  # a damaged index fails here, plainly
    try:
        with _quiet_in_one_process():
            tensors = _load_state_dict_from_keys(keys, checkpoint_id=path)
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from None
    return state | tensors
