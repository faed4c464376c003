"""``kill -9`` at random moments of a run, checkpoint writes included: no
completed checkpoint is lost, and the run, started again each time with
the same command (``--auto-resume``), ends with the uninterrupted run's
losses bit for bit.

The suite runs COOM_KILL_TRIALS random trials (1 by default); the long
sweep is ``benchmarks/kill_sweep.py``, which runs it with more.
"""
import contextlib
import os
import random
import subprocess
import sys
import time

import pytest

from coom.checkpoint.storage import complete_checkpoints, damage
from coom.train.metrics import read_metrics

TRIALS = int(os.environ.get("COOM_KILL_TRIALS", "1"))
KILLS_PER_TRIAL = 3
COMPARED = ("step", "loss", "lr", "grad_norm", "val_loss",
            "consumed_samples")


def _start(run, small_run) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "coom", "train", "tiny", "--run-dir",
         str(run), "--auto-resume", "--set", *small_run,
         "checkpoint.interval=1", "checkpoint.keep=10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"})


def _whole(run) -> dict[str, None]:
    """The complete checkpoints whose files match their manifests."""
    return {path.name: None for path in complete_checkpoints(
        run / "checkpoints") if damage(path) is None}


def _kill(process, run) -> None:
    """kill -9, and check that every checkpoint complete just before is
    still complete and whole."""
    before = _whole(run)
    process.kill()
    process.wait()
    print(f"killed; complete before: {', '.join(before) or 'none'}; "
          f"writing: {len(_writing(run))}")
    lost = [name for name in before if name not in _whole(run)]
    assert not lost, f"killed, {lost} no longer complete and whole"


def _writing(run) -> set[int]:
    """The inodes of the checkpoint folders being written."""
    found = set()
    for path in (run / "checkpoints").glob(".tmp-step_*"):
        with contextlib.suppress(FileNotFoundError):  # just renamed
            found.add(path.stat().st_ino)
    return found


def _finish(process) -> None:
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors[-3000:]


@pytest.fixture(scope="module")
def straight(small_run, tmp_path_factory) -> tuple[list[dict], float]:
    """The uninterrupted run's metrics, and its seconds from start to
    end."""
    run = tmp_path_factory.mktemp("straight") / "run"
    started = time.monotonic()
    _finish(_start(run, small_run))
    return read_metrics(run), time.monotonic() - started


def _same_as(straight, run) -> None:
    straight, _ = straight
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for ours, theirs in zip(resumed, straight):
        for key in COMPARED:
            assert ours.get(key) == theirs.get(key), (key, ours["step"])


@pytest.mark.parametrize("seed", range(TRIALS))
def test_kill_9_at_random_moments(small_run, straight, tmp_path, seed):
    """Up to three kills, each at a random moment of what an
    uninterrupted run takes from its start (the process's start, data,
    steps, evaluations and checkpoint writes), then the run goes to its
    end."""
    draw = random.Random(seed)
    run = tmp_path / "run"
    _, seconds = straight
    for _ in range(KILLS_PER_TRIAL):
        process = _start(run, small_run)
        try:
            process.wait(timeout=draw.uniform(0.1, 0.8) * seconds)
        except subprocess.TimeoutExpired:
            _kill(process, run)
            continue
        assert process.returncode == 0, process.stderr.read()[-3000:]
        break
    else:
        _finish(_start(run, small_run))
    _same_as(straight, run)


def test_kill_9_while_a_checkpoint_is_written(small_run, straight,
                                              tmp_path):
    """Killed the moment a checkpoint's temporary folder appears, twice:
    the checkpoints before stay whole, and the run still ends as the
    uninterrupted one."""
    run = tmp_path / "run"
    for _ in range(2):
        left = _writing(run)  # a killed write's folder, until cleaned up
        process = _start(run, small_run)
        deadline = time.monotonic() + 120
        while not _writing(run) - left:
            assert process.poll() is None, "ended before a checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        _kill(process, run)
    _finish(_start(run, small_run))
    _same_as(straight, run)
