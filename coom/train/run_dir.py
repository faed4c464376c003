"""A run directory's own files: ``config.yaml``, ``run_info.json``,
``fp8_products.json`` and the lock.

``coom train`` writes ``config.yaml`` before anything else, so a run
killed in its first seconds (while its data is prepared) can be resumed.
The files are written whole: a temporary file, fsynced, then renamed
over the old one, so a kill leaves the old file or the new one, never a
part. ``run_info.json`` keeps what started the run and adds what resumed
it, each time. ``fp8_products.json`` says which products run in FP8
(``coom.fp8.filter``); each start of training writes it again.

Paths in ``config.yaml`` lie in the run (the tokenizer copied into it),
stored relative to it, or outside it, stored absolute; the run works from
any folder, and after it is moved.

While a run trains, its first process holds ``lock`` (``fcntl.flock``):
a second ``coom train`` on the same directory is refused, rather than
the two deleting each other's temporary checkpoints. The kernel drops
the lock when the process ends, however it ends.
"""
import fcntl
import json
import os
import platform
import time
from pathlib import Path
from typing import IO

import yaml

from coom.config import RunConfig, config_from_tree, read_yaml
from coom.errors import UserError
from coom.fp8.filter import Choice, describe
from coom.train.metrics import run_info

CONFIG = "config.yaml"
RUN_INFO = "run_info.json"
FP8_PRODUCTS = "fp8_products.json"
LOCK = "lock"
# The config fields that hold paths, by section.
PATH_FIELDS = {"data": ("paths", "tokenizer", "cache_dir"),
               "checkpoint": ("init_from",)}


def write_atomically(path: Path, text: str) -> None:
    """Replace path's contents with text, all at once."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _map_paths(tree: dict, change) -> None:
    """Apply change to every path in a config's tree, in place."""
    for section, names in PATH_FIELDS.items():
        fields = tree.get(section)
        if not isinstance(fields, dict):
            continue
        for name in names:
            value = fields.get(name)
            if isinstance(value, list):
                fields[name] = [change(str(item)) for item in value]
            elif value is not None:
                fields[name] = change(str(value))


def _stored(path: str, run_dir: Path) -> str:
    """path as config.yaml keeps it: relative to the run if inside it."""
    absolute = os.path.abspath(path)
    inside = os.path.relpath(absolute, os.path.abspath(run_dir))
    return absolute if inside.startswith(os.pardir) else inside


def _loaded(path: str, run_dir: Path) -> str:
    """A path of config.yaml, resolved from the run. Runs written before
    paths were kept so named them from the folder they were launched
    in; such a path that exists from here is kept as it is."""
    if os.path.isabs(path):
        return path
    found = str(run_dir / path)
    older = not _exists(found) and _exists(path)
    return path if older else found


def _exists(path: str) -> bool:
    """A file, a folder, or a Megatron dataset prefix (PATH.bin)."""
    return os.path.exists(path) or os.path.exists(path + ".bin")


def write_config(run_dir: Path, config: RunConfig) -> None:
    """Write config as the run's config.yaml, atomically."""
    tree = config.to_dict()
    _map_paths(tree, lambda path: _stored(path, run_dir))
    write_atomically(run_dir / CONFIG,
                     yaml.safe_dump(tree, sort_keys=False))


def read_config(run_dir: Path, overrides: list[str] | None = None
                ) -> RunConfig:
    """The run's config plus ``--set`` overrides (whose paths are the
    user's, from the current folder)."""
    path = run_dir / CONFIG
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise UserError(f"{path} holds no config (it is empty or damaged); "
                        "restore it, or start the run again with "
                        "--overwrite")
    _map_paths(tree, lambda value: _loaded(value, run_dir))
    return config_from_tree(tree, overrides)


def record_run_info(run_dir: Path) -> None:
    """Write run_info.json for a run that starts, or add this process's
    info to its ``resumes`` when the run already has one."""
    path = run_dir / RUN_INFO
    info = run_info() | {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if path.is_file():
        try:
            started = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            started = None
        if isinstance(started, dict):
            started.setdefault("resumes", []).append(info)
            info = started
        else:  # kept for a person to read; a new record starts
            os.replace(path, path.with_name(f"{RUN_INFO}.unreadable"))
    write_atomically(path, json.dumps(info, indent=1))


def record_fp8_choices(run_dir: Path, choices: list[Choice]) -> None:
    """Print which products run in FP8, and write them to
    fp8_products.json; with FP8 off, remove an earlier start's."""
    path = run_dir / FP8_PRODUCTS
    if not choices:
        path.unlink(missing_ok=True)
        return
    print(describe(choices))
    write_atomically(path, json.dumps(
        [choice.record() for choice in choices], indent=1))


def hold_lock(run_dir: Path) -> IO:
    """Take run_dir's lock for as long as the returned file stays open,
    or refuse in one line when another process holds it or the folder
    cannot be written."""
    path = run_dir / LOCK
    try:
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(13, "Permission denied")
        file = open(path, "a+")
    except OSError as error:
        raise UserError(f"cannot write in the run directory {run_dir} "
                        f"({error.strerror}); make it writable, or copy "
                        "the run to a folder that is") from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        raise UserError(f"run directory {run_dir} is in use by {holder}; "
                        "wait for it to end or stop it first") from None
    except OSError:
        # A file system without locks (some network ones): the run goes
        # on unguarded rather than not at all.
        return file
    file.seek(0)
    file.truncate()
    file.write(f"process {os.getpid()} on {platform.node()}\n")
    file.flush()
    return file
