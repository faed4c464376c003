import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from coom.checkpoint.storage import (
    complete_checkpoints,
    damage,
    latest_checkpoint,
    load_checkpoint,
    load_sharded,
    read_train_state,
    save_checkpoint,
    set_aside_damaged,
    tensor_shapes,
)
from coom.errors import UserError
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
# (module:attribute) it calls while saving, and the checkpoint a resume
# then takes: once renamed, step 2 is complete, pointer or not.
KILL_POINTS = {
    "while writing the tensors": (
        "torch.distributed.checkpoint.filesystem:FileSystemWriter."
        "write_data", "step_0000001"),
    "while writing the train state": ("torch:save", "step_0000001"),
    "before the rename": ("os:rename", "step_0000001"),
    "before the pointer moves": ("os:replace", "step_0000002"),
}

WRITER = textwrap.dedent("""
    import importlib, os, signal, sys
    import torch
    from coom.checkpoint import storage
    folder, target = storage.Path(sys.argv[1]), sys.argv[2]
    tensors = {"weights": torch.ones(512, 512)}
    storage.save_checkpoint(folder, 1, tensors, {"step": 1}, 2)
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
    storage.save_checkpoint(folder, 2, tensors, {"step": 2}, 2)
""")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_writer_killed_mid_write_leaves_previous_loadable(tmp_path, point):
    folder = tmp_path / "checkpoints"
    target, expected = KILL_POINTS[point]
    result = subprocess.run(
        [sys.executable, "-c", WRITER, str(folder), target],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    path = latest_checkpoint(folder)
    assert path.name == expected
    assert load_checkpoint(path)["step"] == int(expected[-1])
    # the next save cleans the debris and moves on
    _save(folder, 3)
    assert latest_checkpoint(folder).name == "step_0000003"
    assert not list(folder.glob(".tmp-*"))


def test_the_newest_complete_checkpoint_wins_over_the_pointer(tmp_path):
    """A kill between the rename and the pointer's move leaves the
    pointer one checkpoint behind, or absent before the first move."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "latest").write_text("step_0000001\n")
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    (tmp_path / "latest").write_text("step_0000009\n")
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    (tmp_path / "step_0000003").mkdir()  # no meta.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step_0000002"


def test_of_one_step_the_pointer_picks_among_its_checkpoints(tmp_path):
    """A growth or a rebalance publishes a step's checkpoint again beside
    it, with a suffix; the last published is the one to resume from."""
    _save(tmp_path, 2)
    save_checkpoint(tmp_path, 2, _tensors(2), {"step": 2}, keep=3,
                    suffix="-rebalanced")
    save_checkpoint(tmp_path, 2, _tensors(2), {"step": 2}, keep=3,
                    suffix="-grown")
    assert latest_checkpoint(tmp_path).name == "step_0000002-grown"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_0000002-rebalanced"
    assert [path.name for path in complete_checkpoints(tmp_path)] == [
        "step_0000002", "step_0000002-grown", "step_0000002-rebalanced"]


@pytest.mark.parametrize("damaged", ["train_state.pt", ".metadata",
                                     "__0_0.distcp"])
def test_unreadable_files_are_reported(tmp_path, damaged):
    _save(tmp_path, 1)
    path = latest_checkpoint(tmp_path)
    (path / damaged).write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)


def _model_and_optimizer() -> dict:
    """A trained Linear's weights and AdamW state, as the trainer saves
    them."""
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    weights, moments = get_state_dict(model, optimizer)
    return {"model": weights, "optimizer": moments}


def test_a_truncated_shard_is_reported_in_one_line(tmp_path):
    """DCP's reader fails on a shard cut short with an EOFError that has
    no message."""
    save_checkpoint(tmp_path, 1, _model_and_optimizer(), {"step": 1}, 2)
    path = latest_checkpoint(tmp_path)
    os.truncate(path / "__0_0.distcp", 1000)
    with pytest.raises(UserError) as caught:
        load_sharded(path, _model_and_optimizer())
    assert str(caught.value) == (
        f"cannot read checkpoint {path}: a file in it ends early "
        "(truncated, or partly copied)")


def _saving_the_train_state_fails(error: Exception):
    """torch.save, raising error for train_state.pt (DCP uses it too)."""
    save = torch.save

    def failing(obj, path, *args, **kwargs):
        if str(path).endswith("train_state.pt"):
            raise error
        return save(obj, path, *args, **kwargs)
    return failing


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# What torch.save raises when the disk fills.
ENFORCE_FAIL = RuntimeError(
    "[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
    "failed writing file data/0: file write failed")


@pytest.mark.parametrize("target, failure, file, reason", [
    ("torch.save", _saving_the_train_state_fails(ENFORCE_FAIL),
     ".tmp-step_0000002/train_state.pt",
     "PytorchStreamWriter failed writing file data/0: file write failed ("),
    ("torch.distributed.checkpoint.filesystem._write_item", _no_space,
     ".tmp-step_0000002", "No space left on device;")],
    ids=["train-state", "shards"])
def test_a_failed_write_names_the_file_and_the_intact_checkpoint(
        tmp_path, monkeypatch, target, failure, file, reason):
    _save(tmp_path, 1)
    monkeypatch.setattr(target, failure)
    with pytest.raises(UserError) as caught:
        _save(tmp_path, 2)
    assert str(caught.value).startswith(
        f"cannot write {tmp_path / file}: {reason}")
    assert str(caught.value).endswith(
        "; the newest complete checkpoint, step_0000001, is intact")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "latest", "step_0000001"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1


def test_a_bug_while_saving_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.save", _saving_the_train_state_fails(
        RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        _save(tmp_path, 1)


FAILING_SAVE = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from coom.errors import UserError
    from coom.checkpoint import storage
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        def full_disk(*args):
            raise OSError(28, "No space left on device")
        storage._write_pointer = full_disk
    try:
        storage.save_checkpoint(storage.Path(sys.argv[1]), 1,
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
    pointer = tmp_path / "checkpoints" / "latest"
    assert (f"rank 0: cannot write {pointer}: No space left on device; the "
            "newest complete checkpoint, step_0000001, is intact"
            ) in result.stdout
    assert ("rank 1: saving the checkpoint failed on the first process: "
            f"WriteError: cannot write {pointer}") in result.stdout


@pytest.mark.parametrize("damage_file, problem", [
    (lambda path: (path / "train_state.pt").unlink(),
     "train_state.pt is missing"),
    (lambda path: os.truncate(path / "__0_0.distcp", 100),
     "__0_0.distcp holds 100 bytes, not"),
    (lambda path: _flip_a_byte(path / "__0_0.distcp"),
     "__0_0.distcp does not match its checksum"),
    (lambda path: (path / "meta.json").write_text("{not json"),
     "meta.json is unreadable"),
])
def test_damaged_checkpoints_are_set_aside_newest_first(
        tmp_path, damage_file, problem):
    """Each checkpoint lists its files' sizes and checksums; the newest
    one that fails them is renamed aside, kept, and the one before it
    becomes the latest."""
    for step in (1, 2):
        _save(tmp_path, step)
    assert damage(tmp_path / "step_0000002") is None
    damage_file(tmp_path / "step_0000002")
    assert problem in damage(tmp_path / "step_0000002")
    [line] = set_aside_damaged(tmp_path)
    assert line.startswith("checkpoint step_0000002 is damaged (")
    assert line.endswith("set aside as damaged-step_0000002")
    assert (tmp_path / "damaged-step_0000002").is_dir()
    assert latest_checkpoint(tmp_path).name == "step_0000001"
    assert (tmp_path / "latest").read_text().strip() == "step_0000001"
    assert set_aside_damaged(tmp_path) == []
    _save(tmp_path, 3)
    assert (tmp_path / "damaged-step_0000002").is_dir()


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
