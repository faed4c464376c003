"""Launching processes for the multi-process tests: ``coom`` or a script,
alone or under torchrun, or several ``coom`` commands in one torchrun
launch (``Runs``, ``GroupedRuns``): process start-up is most of a small
run's time on the 2-core CI machine.

A torchrun process on gloo can die at SIGABRT with "terminate called
without an active exception" from C++, after its work, with no Python
frame on the stack: objects in reference cycles that hold gloo's process
groups, freed at the interpreter's exit. A two-process script of
``test_expert`` did so in 3 to 5 of 20 runs, and in none of 30 with a
garbage collection before it left its process group, which
``World.close`` and the test scripts now do. A launch that aborts so
still runs once more, with a warning that carries the first attempt's
output; any other failure, and a second abort, stays a failure. Every
process runs with ``faulthandler`` on, so an abort prints each thread's
Python stack into that output, to find the cause from.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

ABORT = "terminate called without an active exception"


def command(processes: int, *arguments: str) -> list[str]:
    """``python -m coom ARGUMENTS`` for one process, under torchrun for
    more; a first argument ending in .py runs that script instead."""
    target = list(arguments) if arguments[0].endswith(".py") \
        else ["-m", "coom", *arguments]
    if processes == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", *target]


def launch(processes: int, *arguments: str, timeout: float = 300,
           before_retry: Optional[Callable[[], None]] = None
           ) -> subprocess.CompletedProcess:
    """Run ``command(processes, *arguments)`` and return its outcome; see
    the module's docstring for the one retry (before_retry undoes what
    the first attempt left behind)."""
    environment = os.environ | {"OMP_NUM_THREADS": "1",
                                "PYTHONFAULTHANDLER": "1"}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(command(processes, *arguments),
                              capture_output=True, text=True,
                              timeout=timeout, env=environment)

    result = run()
    if result.returncode and ABORT in result.stderr:
        warnings.warn(f"a process aborted ({ABORT}); launching again. "
                      f"Its output:\n{result.stdout[-3000:]}\n"
                      f"{result.stderr[-6000:]}")
        if before_retry is not None:
            before_retry()
        result = run()
    return result


def check(result: subprocess.CompletedProcess) -> None:
    """Fail with the output's last lines unless the launch succeeded."""
    if result.returncode:
        raise AssertionError(
            f"{' '.join(result.args)} exited with {result.returncode}\n"
            f"stdout, last lines:\n{result.stdout[-2000:]}\n"
            f"stderr, last lines:\n{result.stderr[-4000:]}")


RUNS = str(Path(__file__).parent / "parallel" / "runs.py")


class Runs:
    """Several ``coom`` commands run in one launch
    (``tests/parallel/runs.py``), each in its own folder.

    Args:
        processes: processes of the launch (2 or more).
        commands: each command's arguments by name; a folder of that name
            in folder holds its exit code (and may be its run directory).
        folder: where the commands' folders go.
    """

    def __init__(self, processes: int, commands: dict[str, list[str]],
                 folder: Path, timeout: float = 900):
        folders = {name: folder / name for name in commands}
        plan = [{"arguments": arguments,
                 "exit_code": str(folders[name] / "exit_code")}
                for name, arguments in commands.items()]
        plan_file = folder / f"plan-{processes}.json"
        plan_file.write_text(json.dumps(plan))

        def start_again():
            for path in folders.values():
                shutil.rmtree(path, ignore_errors=True)

        self.folders = folders
        self.result = launch(processes, RUNS, str(plan_file),
                             timeout=timeout, before_retry=start_again)

    def check(self, name: str) -> Path:
        """name's folder, once its command exited with 0; else fail with
        the launch's output."""
        code = self.folders[name] / "exit_code"
        if not code.is_file() or code.read_text().strip() != "0":
            check(self.result)
            raise AssertionError(
                f"{name} exited with "
                f"{code.read_text().strip() if code.is_file() else 'none'}"
                f"\nstdout, last lines:\n{self.result.stdout[-2000:]}"
                f"\nstderr, last lines:\n{self.result.stderr[-4000:]}")
        return self.folders[name]


class GroupedRuns:
    """``coom train`` runs by name, each in its own run directory of
    folder, trained one launch per process count (``Runs``) when the
    first of that count is asked for.

    Args:
        layouts: each run's processes and ``--set`` overrides, by name.
        folder: where the run directories go.
        arguments: what every run's ``--set`` starts with (its recipe
            first).
    """

    def __init__(self, layouts: dict[str, tuple[int, list[str]]],
                 folder: Path, arguments: list[str]):
        self.layouts, self.folder = layouts, folder
        self.arguments = arguments
        self.launched = {}

    def run_dir(self, name: str) -> Path:
        """name's run directory, once it trained without error."""
        processes = self.layouts[name][0]
        if processes not in self.launched:
            self.launched[processes] = Runs(processes, {
                other: ["train", "--run-dir", str(self.folder / other),
                        *self.arguments, *overrides]
                for other, (count, overrides) in self.layouts.items()
                if count == processes}, self.folder)
        return self.launched[processes].check(name)
