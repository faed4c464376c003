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
  It lists every other file with its size and CRC-32, which a resume
  checks (``set_aside_damaged``).

It is written as ``.tmp-step_NNNNNNN``, every file and the folder are
fsynced, then it is renamed into place, and only then does the
``latest`` pointer (itself replaced atomically) move to it. Older
checkpoints beyond the ones kept are deleted after the pointer has moved.
A process killed at any point therefore leaves the old checkpoint
complete, and the new one either complete or in a temporary folder, which
is ignored and cleaned up by the next save. The pointer is for people and
other tools: a run resumes from its newest complete checkpoint, which a
kill between the rename and the pointer's move leaves unnamed.

Under torchrun every process calls ``save_checkpoint`` and
``load_sharded``; the folder must be one all processes see (one machine,
or a shared file system).
"""
import contextlib
import json
import os
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager
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
DAMAGED = "damaged-"
"""Prefix of a checkpoint set aside because its files fail its manifest.
"""
CHUNK = 1 << 24


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


class WriteError(Exception):
    """A checkpoint's file could not be written (disk full, permissions);
    the message names it."""


@contextlib.contextmanager
def _writing(path: Path):
    """Turn a failure to write path into a WriteError naming the file
    (or, for DCP's shards, the one the error names): torch.save's own
    says only ``[enforce fail at inline_container.cc...]``."""
    try:
        yield
    except (OSError, RuntimeError, dcp.CheckpointException) as error:
        cause = error
        if isinstance(error, dcp.CheckpointException) and error.failures:
            cause, _ = next(iter(error.failures.values()))
        # torch.save reports a failed write as its zip writer's
        # RuntimeError; any other error is a bug, not the disk's.
        if not (isinstance(cause, OSError)
                or "PytorchStreamWriter" in str(cause)):
            raise
        if isinstance(cause, OSError) and cause.strerror:
            path = Path(cause.filename or path)
            reason = cause.strerror
        else:
            # torch.save does not say why; a full disk is the usual cause.
            existing = next(folder for folder in path.parents
                            if folder.exists())
            free = shutil.disk_usage(existing).free
            reason = (f"{_reason(cause).split('] . ')[-1]} ({free:,} bytes "
                      "free on its disk)")
        raise WriteError(f"cannot write {path}: {reason}") from None


def _write_the_rest(folder: Path, train_state: dict,
                    names: list[str]) -> None:
    """The first process's part, once every process wrote its tensors:
    train_state, then ``meta.json`` with the manifest, each file and the
    folder fsynced."""
    def write():
        with _writing(folder / TRAIN_STATE):
            torch.save(train_state, folder / TRAIN_STATE)
        meta = {"step": train_state.get("step"), "tensors": names,
                "format": "torch.distributed.checkpoint, plus "
                "train_state.pt", "files": _manifest(folder)}
        with _writing(folder / META):
            (folder / META).write_text(json.dumps(meta))
        with _writing(folder):
            for path in folder.iterdir():
                _fsync(path)
            _fsync(folder)
    _on_first_process(write)


def write_checkpoint_folder(folder: Path, tensors: dict,
                            train_state: dict) -> None:
    """Write a checkpoint's files into the existing folder: tensors with
    DCP (every process, collectively), then, by the first process,
    train_state and ``meta.json``, each file fsynced. tensors' values may
    be sharded (DTensors)."""
    with _quiet_in_one_process(), _writing(folder):
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(folder))
    _write_the_rest(folder, train_state, sorted(tensors))


class _Publication:
    """Where a checkpoint is written and how it is published: into a
    temporary folder, then renamed into place, the pointer moved and the
    oldest beyond keep deleted."""

    def __init__(self, folder: Path, step: int, keep: int, suffix: str):
        self.folder, self.keep = folder, keep
        self.name = f"{PREFIX}{step:07d}{suffix}"
        self.temporary = folder / f".tmp-{self.name}"
        self.final = folder / self.name

    def prepare(self) -> None:
        def make():
            with _writing(self.temporary):
                self.folder.mkdir(parents=True, exist_ok=True)
                for stale in self.folder.glob(".tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                self.temporary.mkdir()
        _on_first_process(make)

    def publish(self) -> Path:
        def rename():
            with _writing(self.final):
                if self.final.exists():
                    shutil.rmtree(self.final)
                os.rename(self.temporary, self.final)
                _fsync(self.folder)
            with _writing(self.folder / LATEST):
                _write_pointer(self.folder, self.name)
            for old in sorted(self.folder.glob(f"{PREFIX}*"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _on_first_process(rename)
        return self.final

    def failed(self, failure: WriteError) -> UserError:
        """The one-line error of a write that failed, what was written
        removed."""
        if _main():  # what was written would fill the disk further
            shutil.rmtree(self.temporary, ignore_errors=True)
        latest = latest_checkpoint(self.folder)
        intact = (f"the newest complete checkpoint, {latest.name}, is "
                  "intact" if latest else "no checkpoint was complete yet")
        return UserError(f"{failure}; {intact}")


def save_checkpoint(folder: Path, step: int, tensors: dict,
                    train_state: dict, keep: int, suffix: str = "") -> Path:
    """Write the checkpoint of step (named ``step_NNNNNNN`` plus suffix)
    and keep the newest ``keep``. Every process calls it; only the first
    one's train_state is written. A file that cannot be written ends in
    a UserError naming it and the checkpoint left intact."""
    publication = _Publication(folder, step, keep, suffix)
    try:
        publication.prepare()
        write_checkpoint_folder(publication.temporary, tensors, train_state)
        return publication.publish()
    except WriteError as failure:
        raise publication.failed(failure) from None


class BackgroundSave:
    """A checkpoint whose tensors are written while training goes on:
    stager copies them to CPU memory (``coom.checkpoint.staging``), then
    DCP writes the copy from a thread, its collectives on group.
    ``finish`` waits for the write, then writes the rest and publishes
    the checkpoint as ``save_checkpoint`` does, so it is as atomic;
    every process calls both, at the same step."""

    def __init__(self, folder: Path, step: int, tensors: dict,
                 train_state: dict, keep: int, stager: AsyncStager,
                 group=None):
        self.publication = _Publication(folder, step, keep, "")
        self.train_state, self.names = train_state, sorted(tensors)
        try:
            self.publication.prepare()
            temporary = self.publication.temporary
            with _quiet_in_one_process(), _writing(temporary):
                self.future = dcp.async_save(
                    tensors, storage_writer=dcp.FileSystemWriter(temporary),
                    process_group=group, async_stager=stager)
        except WriteError as failure:
            raise self.publication.failed(failure) from None

    def done(self) -> bool:
        """Whether this process's tensors are written."""
        return self.future.done()

    def finish(self) -> Path:
        temporary = self.publication.temporary
        try:
            with _quiet_in_one_process(), _writing(temporary):
                self.future.result()
            _write_the_rest(temporary, self.train_state, self.names)
            return self.publication.publish()
        except WriteError as failure:
            raise self.publication.failed(failure) from None


def _step_of(path: Path) -> int | None:
    """The step a checkpoint folder's name gives (``step_NNNNNNN``, then
    any suffix), or None for another name."""
    digits = re.match(rf"{PREFIX}(\d+)", path.name)
    return int(digits[1]) if digits else None


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in folder, oldest first: by step, and a
    step's plain checkpoint before those published beside it (grown,
    rebalanced)."""
    found = [(_step_of(path), path.name, path)
             for path in folder.glob(f"{PREFIX}*")
             if _step_of(path) is not None and is_checkpoint(path)]
    return [path for *_, path in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in folder, or None before any,
    whatever the ``latest`` pointer says: a process killed after the
    rename leaves the pointer behind, or none at all. Of several of one
    step, the one the pointer names, else the last by name."""
    kept = complete_checkpoints(folder)
    if not kept:
        return None
    newest = [path for path in kept if _step_of(path) == _step_of(kept[-1])]
    pointer = folder / LATEST
    named = (pointer.read_text(errors="replace").strip()
             if pointer.is_file() else None)
    return next((path for path in newest if path.name == named),
                newest[-1])


def is_checkpoint(folder: Path) -> bool:
    return (folder / META).is_file()


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _manifest(folder: Path) -> dict[str, list[int]]:
    """Each file of a checkpoint folder but meta.json: [size, CRC-32]."""
    return {path.name: [path.stat().st_size, _crc32(path)]
            for path in sorted(folder.iterdir())
            if path.is_file() and path.name != META}


def damage(path: Path) -> Optional[str]:
    """What is wrong with a complete checkpoint's files, by its manifest:
    the first one missing, of another size or another checksum; None if
    all match, or for a checkpoint written before manifests."""
    try:
        files = json.loads((path / META).read_text()).get("files", {})
    except (OSError, ValueError) as error:
        return f"{META} is unreadable ({_reason(error)})"
    for name, (size, crc) in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return (f"{name} holds {file.stat().st_size:,} bytes, not "
                    f"{size:,}")
        if _crc32(file) != crc:
            return f"{name} does not match its checksum"
    return None


def set_aside_damaged(folder: Path) -> list[str]:
    """Check the newest complete checkpoints against their manifests,
    newest first, until one passes; rename each that fails to
    ``damaged-NAME`` (kept, for a person to look at) and point
    ``latest`` at the one that passed. Returns a line for each set
    aside. Call it on the first process, before any reads the folder
    (``coom train`` does, before the processes join)."""
    lines = []
    for path in reversed(complete_checkpoints(folder)):
        problem = damage(path)
        if problem is None:
            if lines:
                _write_pointer(folder, path.name)
            break
        path.rename(path.with_name(DAMAGED + path.name))
        lines.append(f"checkpoint {path.name} is damaged ({problem}): set "
                     f"aside as {DAMAGED + path.name}")
    return lines


def _unreadable(path: Path, error: BaseException) -> UserError:
    if isinstance(error, dcp.CheckpointException) and error.failures:
        # The first failing process's (exception, traceback), rather than
        # the list of ranks.
        error, _ = next(iter(error.failures.values()))
    return UserError(f"cannot read checkpoint {path}: {_reason(error)}")


def _reason(error: BaseException) -> str:
    """The first line of error's message; a bare EOFError (a shard cut
    short) has none."""
    lines = str(error).strip().splitlines()
    if lines:
        return lines[0]
    if isinstance(error, EOFError):
        return "a file in it ends early (truncated, or partly copied)"
    return type(error).__name__


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
