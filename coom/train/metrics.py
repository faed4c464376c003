"""What a run records: metrics.jsonl, TensorBoard events, run info.

``metrics.jsonl`` holds one JSON object per logged step, appended and
flushed as the run goes, so it survives a crash and a resumed run extends
it. ``run_info.json`` records what produced the run: the git SHA of COOM,
the package versions, the machine and the command line
(``coom.train.run_dir`` writes it).
"""
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "megatron-core", "tokenizers", "numpy", "triton")


class MetricsWriter:
    """Appends metric records to metrics.jsonl and TensorBoard; with
    enabled false (the other processes of a torchrun launch), writes
    nothing."""

    def __init__(self, run_dir: Path, tensorboard: bool,
                 enabled: bool = True):
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled \
            else None
        self.board = None
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """Records of metrics.jsonl; a resumed run's later records win. A
    line that holds no record (a process killed while writing it leaves
    it cut short) is skipped with a warning naming it."""
    by_step = {}
    path = run_dir / "metrics.jsonl"
    with open(path, errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            record = _record(line)
            if record is None:
                print(f"warning: {path} line {number} holds no metrics "
                      "record; skipped", file=sys.stderr)
                continue
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def _record(line: str) -> dict | None:
    """The record a line of metrics.jsonl holds, or None."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"),
                                                      int):
        return None
    return record


def _git_sha() -> str:
    source = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain"],
            capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _machine() -> dict:
    machine = {"platform": platform.platform(), "host": platform.node(),
               "cpu_count": os.cpu_count(), "processor": platform.machine()}
    if torch.cuda.is_available():
        machine["gpus"] = [torch.cuda.get_device_name(i)
                           for i in range(torch.cuda.device_count())]
    return machine


def run_info() -> dict:
    """Git SHA, package versions, machine and command of this process."""
    return {"git_sha": _git_sha(), "versions": _versions(),
            "machine": _machine(), "command": sys.argv}
