"""Launching processes for the multi-process tests: ``coom`` or a script,
alone or under torchrun.

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
import os
import subprocess
import sys
import warnings
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
