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
    load_sharded,
    read_train_state,
    save_checkpoint,
    tensor_shapes,
)
from tests.launch import launch


def _tensors(step: int) -> dict:
    return {"weights": torch.full((64, 64), float(step))}


def _save(folder, step: int) -> None:
    save_checkpoint(folder, step, _tensors(step), {"step": step}, keep=2)


def test_save_and_load_round_trip(tmp_path):
    folder = tmp_path / "checkpoints"
    assert latest_checkpoint(folder) is None
    _save(folder, 5)
    path = latest_checkpoint(folder)
    assert path.name == "step_0000005"
    state = load_checkpoint(path)
    assert state["step"] == read_train_state(path)["step"] == 5
    assert torch.equal(state["weights"], _tensors(5)["weights"])
    assert tensor_shapes(path) == {"weights": (64, 64)}


def test_sharded_load_fills_in_place(tmp_path):
    _save(tmp_path, 3)
    tensors = {"weights": torch.zeros(64, 64)}
    load_sharded(latest_checkpoint(tmp_path), tensors)
    assert torch.equal(tensors["weights"], _tensors(3)["weights"])


def test_only_the_newest_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    kept = sorted(p.name for p in tmp_path.glob("step_*"))
    assert kept == ["step_0000003", "step_0000004"]
    assert latest_checkpoint(tmp_path).name == "step_0000004"


# Each point is where the writer of step 2 dies with SIGKILL: a function
# (module:attribute) it calls while saving.
KILL_POINTS = {
    "while writing the tensors":
        "torch.distributed.checkpoint.filesystem:FileSystemWriter."
        "write_data",
    "while writing the train state": "torch:save",
    "before the rename": "os:rename",
    "before the pointer moves": "os:replace",
}

WRITER = textwrap.dedent("""
    import importlib, os, signal, sys
    import torch
    from coom.train import checkpoint
    folder, target = checkpoint.Path(sys.argv[1]), sys.argv[2]
    tensors = {"weights": torch.ones(512, 512)}
    checkpoint.save_checkpoint(folder, 1, tensors, {"step": 1}, 2)
    module, attribute = target.split(":")
    *path, name = attribute.split(".")
    owner = importlib.import_module(module)
    for part in path:
        owner = getattr(owner, part)
    def die(*args, **kwargs):
        # leave a partly written file behind, as a real crash would
        temporary = folder / ".tmp-step_0000002"
        if temporary.exists():
            (temporary / "partial").write_bytes(b"PK\\x03\\x04 half")
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(owner, name, die)
    checkpoint.save_checkpoint(folder, 2, tensors, {"step": 2}, 2)
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
    _save(folder, 3)
    assert latest_checkpoint(folder).name == "step_0000003"
    assert not list(folder.glob(".tmp-*"))


def test_pointer_to_a_missing_checkpoint_is_reported(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "latest").write_text("step_0000009\n")
    with pytest.raises(UserError, match="step_0000009"):
        latest_checkpoint(tmp_path)


@pytest.mark.parametrize("damaged", ["train_state.pt", ".metadata",
                                     "__0_0.distcp"])
def test_unreadable_files_are_reported(tmp_path, damaged):
    _save(tmp_path, 1)
    path = latest_checkpoint(tmp_path)
    (path / damaged).write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)


FAILING_SAVE = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from coom.errors import UserError
    from coom.train import checkpoint
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        def full_disk(*args):
            raise OSError(28, "No space left on device")
        checkpoint._write_pointer = full_disk
    try:
        checkpoint.save_checkpoint(checkpoint.Path(sys.argv[1]), 1,
                                   {"w": torch.ones(4)}, {"step": 1}, 2)
    except (OSError, UserError) as error:
        print(f"rank {rank}: {error}", flush=True)
        sys.exit(3)
""")


def test_a_save_that_fails_on_the_first_process_stops_them_all(tmp_path):
    """The first process alone writes the pointer; when that fails the
    others hear of it rather than wait in a barrier for ever."""
    script = tmp_path / "save.py"
    script.write_text(FAILING_SAVE)
    result = launch(2, str(script), str(tmp_path / "checkpoints"),
                    timeout=120)
    assert result.returncode != 0
    assert "rank 0: [Errno 28] No space left on device" in result.stdout
    assert ("rank 1: saving the checkpoint failed on the first process: "
            "OSError") in result.stdout
