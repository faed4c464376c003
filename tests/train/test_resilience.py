"""Faults a long run meets, on real short runs: each case checks that no
completed checkpoint is lost and that the resumed run repeats the
uninterrupted one bit for bit on the CPU."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coom.checkpoint.storage import (
    complete_checkpoints,
    damage,
    latest_checkpoint,
    load_checkpoint,
    read_train_state,
)
from coom.cli import main
from coom.parallel.model import ParallelModel
from coom.train.metrics import read_metrics
from coom.train.trainer import Trainer
from tests.launch import check, launch

COMPARED = ("step", "loss", "lr", "grad_norm", "val_loss",
            "consumed_samples")


def _train(run_dir, overrides, *extra) -> int:
    return main(["train", "tiny", "--run-dir", str(run_dir), *extra,
                 "--set", *overrides])


def _resume(run_dir, *overrides) -> int:
    return main(["train", "--resume", str(run_dir), "--set",
                 "train.exit_interval=null", *overrides])


@pytest.fixture(scope="module")
def straight(small_run, tmp_path_factory):
    """The uninterrupted run the resumed ones must repeat."""
    run = tmp_path_factory.mktemp("straight")
    assert _train(run, small_run) == 0
    return read_metrics(run)


def _same_as(straight, run) -> None:
    resumed = read_metrics(run)
    assert len(resumed) == len(straight) == 7
    for ours, theirs in zip(resumed, straight):
        for key in COMPARED:
            assert ours.get(key) == theirs.get(key), (key, ours["step"])


@pytest.mark.parametrize("damage", [
    lambda path: os.truncate(path / "__0_0.distcp", 1000),
    lambda path: (path / "train_state.pt").unlink(),
    lambda path: (path / ".metadata").write_bytes(b"\0" * 64),
])
def test_a_damaged_newest_checkpoint_is_set_aside_on_resume(
        small_run, straight, tmp_path, capsys, damage):
    """Stopped after step 4 (checkpoints 3 and 4), the newest damaged:
    the resume says so in one line, keeps it aside, and goes on from
    step 3 to the same end."""
    run = tmp_path / "run"
    assert _train(run, small_run + ["train.exit_interval=4"]) == 0
    damage(run / "checkpoints" / "step_0000004")
    capsys.readouterr()
    assert _resume(run) == 0
    out = capsys.readouterr().out
    assert "checkpoint step_0000004 is damaged (" in out
    assert (run / "checkpoints" / "damaged-step_0000004").is_dir()
    assert latest_checkpoint(run / "checkpoints").name == "step_0000006"
    _same_as(straight, run)


def test_a_corrupt_latest_pointer_changes_nothing(small_run, straight,
                                                  tmp_path):
    run = tmp_path / "run"
    assert _train(run, small_run + ["train.exit_interval=4"]) == 0
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe step_9")
    assert _resume(run) == 0
    _same_as(straight, run)


def _inject(monkeypatch, factors: dict[int, float]) -> None:
    """Multiply the loss and gradients of the step whose batch starts at
    sample POSITION by factors[POSITION] (NaN: not finite; 1e6: a
    spike). Keyed by the data, as real spikes are: a rollback that skips
    the batch skips the fault."""
    train_step, forward_backward = (Trainer.train_step,
                                    ParallelModel.forward_backward)
    factor = {}

    def poisoned_step(trainer):
        factor["now"] = factors.get(trainer.consumed_samples)
        return train_step(trainer)

    def poisoned(model, *args, **kwargs):
        sums = forward_backward(model, *args, **kwargs)
        if factor["now"] is None:
            return sums
        with torch.no_grad():
            for parameter in model.model.parameters():
                parameter.grad.mul_(factor["now"])
        return sums * factor["now"]
    monkeypatch.setattr(Trainer, "train_step", poisoned_step)
    monkeypatch.setattr(ParallelModel, "forward_backward", poisoned)


def _state(run, step) -> dict:
    return load_checkpoint(run / "checkpoints" / f"step_{step:07d}")


def _tensors(tree, path: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested state dict (the optimizer's moments and
    step counts lie under state/NAME/), by their path."""
    if isinstance(tree, torch.Tensor):
        return {path: tree}
    items = tree.items() if isinstance(tree, dict) \
        else enumerate(tree) if isinstance(tree, list) else ()
    return {name: tensor for key, value in items
            for name, tensor in _tensors(value, f"{path}/{key}").items()}


def _unchanged(before: dict, after: dict) -> None:
    """Weights, moments and step counts alike in both checkpoints."""
    for part in ("model", "optimizer"):
        ours, theirs = _tensors(before[part]), _tensors(after[part])
        assert ours and ours.keys() == theirs.keys(), part
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), name
    assert any(name.endswith("/exp_avg_sq") for name in
               _tensors(before["optimizer"]))
    assert any(name.endswith("/step") for name in
               _tensors(before["optimizer"]))


FAULTS = str(Path(__file__).with_name("faults.py"))

SPIKES = ["train.anomaly.min_steps=2", "train.anomaly.window=10",
          "train.anomaly.deviations=1000"]


@pytest.mark.parametrize("factor, policy, kind", [
    (math.nan, "log", "not finite"),
    (1e6, "skip", "loss spike"),
])
def test_a_bad_step_leaves_weights_and_optimizer_as_they_were(
        small_run, tmp_path, monkeypatch, capsys, factor, policy, kind):
    """The batch of step 4 (samples 12-15) poisoned: step 4's checkpoint
    holds step 3's weights and moments, its record says why, and step 5
    trains on."""
    _inject(monkeypatch, {12: factor})
    run = tmp_path / "run"
    assert _train(run, small_run + SPIKES + [
        "checkpoint.interval=1", "checkpoint.keep=10",
        f"train.anomaly.spike={policy}"]) == 0
    _unchanged(_state(run, 3), _state(run, 4))
    records = {r["step"]: r for r in read_metrics(run)}
    assert records[4]["anomaly"] == kind
    assert records[4]["anomaly_action"] == "skip"
    assert all("anomaly" not in records[step] for step in (1, 2, 3, 5, 6))
    assert math.isfinite(records[5]["loss"])
    assert f"step 4: {kind}" in capsys.readouterr().out
    assert read_train_state(run / "checkpoints" / "step_0000006")[
        "consumed_samples"] == 24


def test_a_step_not_finite_on_one_process_is_skipped_by_all(small_run,
                                                            tmp_path):
    """Two processes under gloo, the second's step 4 NaN: both skip it,
    so step 4's checkpoint holds step 3's weights, and the run goes on.
    """
    run = tmp_path / "run"
    check(launch(2, FAULTS, "nan", "train", "tiny", "--run-dir", str(run),
                 "--set", *small_run, "checkpoint.interval=1",
                 "checkpoint.keep=10"))
    _unchanged(_state(run, 3), _state(run, 4))
    records = {r["step"]: r for r in read_metrics(run)}
    assert (records[4]["anomaly"], records[4]["anomaly_action"]) == (
        "not finite", "skip")
    assert math.isfinite(records[5]["loss"])


ROLLBACK = SPIKES + ["train.anomaly.spike=rollback", "train.steps=8",
                     "checkpoint.interval=2",
                     "train.anomaly.skip_batches=1"]


def test_a_rollback_returns_to_the_checkpoint_and_skips_the_data(
        small_run, tmp_path, monkeypatch):
    """A spike at step 5 (samples 16-19): back to step 4's checkpoint,
    and steps 5 to 8 read from sample 24 on, past the spike's batch and
    one more."""
    _inject(monkeypatch, {16: 1e6})
    run = tmp_path / "run"
    assert _train(run, small_run + ROLLBACK) == 0
    with open(run / "metrics.jsonl") as file:
        lines = [r for r in map(json.loads, file) if "rollback" in r]
    assert [(r["step"], r["rollback"], r["skipped_samples"])
            for r in lines] == [
        (5, "from step 5 to step_0000004", [16, 24])]
    state = read_train_state(run / "checkpoints" / "step_0000008")
    assert state["skipped_samples"] == [[16, 24]]
    assert state["consumed_samples"] == 24 + 4 * 4


def test_a_rollback_before_any_checkpoint_skips_the_step(
        small_run, tmp_path, monkeypatch):
    """A spike at step 5 with no checkpoint yet: the step is skipped and
    the run ends as any, its last checkpoint written."""
    _inject(monkeypatch, {16: 1e6})
    run = tmp_path / "run"
    assert _train(run, small_run + ROLLBACK + ["checkpoint.interval=100"]
                  ) == 0
    records = {r["step"]: r for r in read_metrics(run)}
    assert records[5]["rollback"] == "no checkpoint yet: the step was skipped"
    assert [r["step"] for r in read_metrics(run)] == list(range(9))
    assert read_train_state(run / "checkpoints" / "step_0000008")[
        "consumed_samples"] == 32


def test_a_run_with_a_rollback_resumes_exactly(small_run, tmp_path,
                                               monkeypatch):
    """Stopped before the spike and after the rollback, and resumed:
    the same losses as straight through."""
    _inject(monkeypatch, {16: 1e6})
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert _train(straight, small_run + ROLLBACK) == 0
    assert _train(pieces, small_run + ROLLBACK
                  + ["train.exit_interval=3"]) == 0
    assert main(["train", "--resume", str(pieces), "--set",
                 "train.exit_interval=6"]) == 0
    assert _resume(pieces) == 0
    expected, resumed = read_metrics(straight), read_metrics(pieces)
    assert [r["step"] for r in resumed] == list(range(9))
    for ours, theirs in zip(resumed, expected, strict=True):
        for key in COMPARED + ("anomaly", "rollback"):
            assert ours.get(key) == theirs.get(key), (key, ours["step"])


def test_a_hang_dumps_the_stacks_and_torchrun_restarts_the_run(
        small_run, tmp_path):
    """Two processes under gloo; the second sleeps in its third step.
    After 6 s the watchdog dumps both processes' stacks and ends them;
    torchrun starts the job again, which resumes from step 2's
    checkpoint and finishes. (torchrun's restarts need its store kept
    apart from the processes': pytorch/pytorch#135712.)"""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc-per-node=2", "--max-restarts=1", FAULTS, "hang", "train",
         "tiny", "--run-dir", str(run), "--auto-resume", "--set",
         *small_run, "checkpoint.interval=1", "train.watchdog_minutes=0.1"],
        capture_output=True, text=True, timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1",
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    check(result)
    dumps = {path.name.split("-")[0]: path.read_text()
             for path in (run / "hangs").iterdir()}
    assert sorted(dumps) == ["rank0", "rank1"]
    assert "Timeout (0:00:06)!" in dumps["rank1"]
    assert "hanging_step" in dumps["rank1"]
    assert "train_step" in dumps["rank0"]
    assert "resumes" in json.loads((run / "run_info.json").read_text())
    assert [r["step"] for r in read_metrics(run)] == list(range(7))
    assert latest_checkpoint(run / "checkpoints").name == "step_0000006"


BACKGROUND = ["checkpoint.interval=1", "checkpoint.keep=10",
              "train.exit_interval=4"]


def test_checkpoints_written_in_the_background_are_the_same(
        small_run, straight, tmp_path):
    """Steps 1 to 3 saved in the background hold what saves made at once
    hold; resumed from step 3's, the run ends as the uninterrupted one."""
    runs = {mode: tmp_path / mode for mode in ("now", "background")}
    for mode, run in runs.items():
        assert _train(run, small_run + BACKGROUND + [
            f"checkpoint.background={mode == 'background'}"]) == 0
    for step in (1, 2, 3):
        now, later = (_state(run, step) for run in runs.values())
        _unchanged(now, later)
        assert now["consumed_samples"] == later["consumed_samples"]
    run = runs["background"]
    assert [path.name for path in complete_checkpoints(
        run / "checkpoints")] == [f"step_{n:07d}" for n in (1, 2, 3, 4)]
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    assert _resume(run, "checkpoint.background=true") == 0
    _same_as(straight, run)


def test_background_checkpoints_of_two_processes(small_run, tmp_path):
    """Under gloo, FSDP over two processes: each checkpoint's shards come
    from both, written on a group of their own, and all are whole."""
    run = tmp_path / "run"
    check(launch(2, "train", "tiny", "--run-dir", str(run), "--set",
                 *small_run, "checkpoint.interval=1", "checkpoint.keep=10",
                 "checkpoint.background=true"))
    paths = complete_checkpoints(run / "checkpoints")
    assert [path.name for path in paths] == [f"step_{n:07d}"
                                             for n in range(1, 7)]
    for path in paths:
        assert damage(path) is None
        assert {"__0_0.distcp", "__1_0.distcp"} <= {
            file.name for file in path.iterdir()}
