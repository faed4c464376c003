import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from coom.errors import UserError
from coom.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _state(step: int) -> dict:
    return {"step": step, "weights": torch.full((64, 64), float(step))}


def test_save_and_load_round_trip(tmp_path):
    folder = tmp_path / "checkpoints"
    assert latest_checkpoint(folder) is None
    save_checkpoint(folder, 5, _state(5), keep=2)
    path = latest_checkpoint(folder)
    assert path.name == "step_0000005"
    state = load_checkpoint(path)
    assert state["step"] == 5
    assert torch.equal(state["weights"], _state(5)["weights"])


def test_only_the_newest_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    kept = sorted(p.name for p in tmp_path.glob("step_*"))
    assert kept == ["step_0000003", "step_0000004"]
    assert latest_checkpoint(tmp_path).name == "step_0000004"


# Each point is where the writer of step 2 dies with SIGKILL.
KILL_POINTS = {
    "while writing the state": "torch.save",
    "before the rename": "os.rename",
    "before the pointer moves": "os.replace",
}

WRITER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from coom.train import checkpoint
    folder, target = sys.argv[1], sys.argv[2]
    state = lambda step: {"step": step, "weights": torch.ones(512, 512)}
    checkpoint.save_checkpoint(checkpoint.Path(folder), 1, state(1), 2)
    module, name = target.split(".")
    owner = torch if module == "torch" else os
    real = getattr(owner, name)
    def die(*args, **kwargs):
        if module == "torch":
            # leave a partly written file behind, as a real crash would
            with open(args[1], "wb") as partial:
                partial.write(b"PK\\x03\\x04 half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(owner, name, die)
    checkpoint.save_checkpoint(checkpoint.Path(folder), 2, state(2), 2)
""")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_writer_killed_mid_write_leaves_previous_loadable(tmp_path, point):
    folder = tmp_path / "checkpoints"
    result = subprocess.run(
        [sys.executable, "-c", WRITER, str(folder), KILL_POINTS[point]],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    path = latest_checkpoint(folder)
    assert path.name == "step_0000001"
    assert load_checkpoint(path)["step"] == 1
    # the next save cleans the debris and moves on
    save_checkpoint(folder, 3, _state(3), keep=2)
    assert latest_checkpoint(folder).name == "step_0000003"
    assert not list(folder.glob(".tmp-*"))


def test_pointer_to_a_missing_checkpoint_is_reported(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), keep=2)
    (tmp_path / "latest").write_text("step_0000009\n")
    with pytest.raises(UserError, match="step_0000009"):
        latest_checkpoint(tmp_path)


def test_unreadable_state_is_reported(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1), keep=2)
    (path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)
