"""A run directory's own files, its paths and its lock; none of these
tests trains."""
import errno
import json
import os

import pytest
import yaml

from coom.cli import main
from coom.config import load_config
from coom.train import run_dir as run_files
from coom.train.run_dir import (
    hold_lock,
    read_config,
    record_run_info,
    write_atomically,
    write_config,
)


def _one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("coom: error: ")
    return err


def _a_run(folder, *overrides):
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, load_config("tiny", list(overrides)))
    return folder


def test_paths_are_kept_from_the_run_and_resolved_from_it(
        tmp_path, monkeypatch):
    """The tokenizer copied into the run is stored relative to it, any
    other path absolute; both resolve wherever the run is read from,
    also after it moves."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    run = _a_run(tmp_path / "runs" / "r", "data.paths=[corpus]",
                 "data.cache_dir=.cache", "data.tokenizer=runs/r/tok.json")
    stored = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert stored["tokenizer"] == "tok.json"
    assert stored["paths"] == [str(tmp_path / "corpus")]
    assert stored["cache_dir"] == str(tmp_path / ".cache")
    moved = tmp_path / "elsewhere" / "r"
    moved.parent.mkdir()
    os.rename(run, moved)
    monkeypatch.chdir(moved.parent)
    data = read_config(moved.resolve(), ["train.steps=50"]).data
    assert data.tokenizer == str(moved.resolve() / "tok.json")
    assert data.paths == [str(tmp_path / "corpus")]


def test_a_relative_path_of_an_older_run_still_resolves(tmp_path,
                                                        monkeypatch):
    """Runs written before paths were kept from the run named them from
    the folder they were launched in."""
    monkeypatch.chdir(tmp_path)
    run = _a_run(tmp_path / "runs" / "r")
    (run / "tokenizer.json").write_text("{}")
    tree = yaml.safe_load((run / "config.yaml").read_text())
    tree["data"]["tokenizer"] = "runs/r/tokenizer.json"
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    config = read_config(run.relative_to(tmp_path))
    assert config.data.tokenizer == "runs/r/tokenizer.json"


def test_overrides_keep_the_users_paths(tmp_path):
    run = _a_run(tmp_path / "run")
    config = read_config(run, ["data.tokenizer=mine.json"])
    assert config.data.tokenizer == "mine.json"


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path,
                                                       monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old: true\n")

    def killed(descriptor):
        raise OSError("killed here")
    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(OSError, match="killed here"):
        write_atomically(path, "new: true\n")
    assert path.read_text() == "old: true\n"


def test_an_empty_config_is_refused_not_replaced_by_defaults(
        tmp_path, capsys):
    """What a kill while config.yaml was rewritten in place left: the
    resume used to train a fresh run of the default recipe."""
    (tmp_path / "config.yaml").write_text("")
    err = _one_error_line(capsys, ["train", "--resume", str(tmp_path)])
    assert "config.yaml holds no config" in err


def test_run_info_keeps_the_start_and_adds_each_resume(tmp_path,
                                                       monkeypatch):
    monkeypatch.setattr("sys.argv", ["coom", "train", "tiny"])
    record_run_info(tmp_path)
    first = json.loads((tmp_path / "run_info.json").read_text())
    for argv in (["coom", "train", "--resume", "a"],
                 ["coom", "train", "--resume", "b"]):
        monkeypatch.setattr("sys.argv", argv)
        record_run_info(tmp_path)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["command"] == ["coom", "train", "tiny"]
    assert info["time"] == first["time"] and info["git_sha"]
    assert [resume["command"][-1] for resume in info["resumes"]] == [
        "a", "b"]
    assert all(resume["git_sha"] and resume["time"]
               for resume in info["resumes"])


def test_a_run_in_use_is_refused_and_left_alone(tmp_path, capsys,
                                                small_run):
    run = _a_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    with hold_lock(run):
        before = sorted(os.listdir(run))
        for argv in (["train", "--resume", str(run)],
                     ["train", "--run-dir", str(run), "--overwrite",
                      "--set", *small_run]):
            err = _one_error_line(capsys, argv)
            assert (f"run directory {run} is in use by process "
                    f"{os.getpid()}") in err
    assert sorted(os.listdir(run)) == before
    with hold_lock(run):  # released: by the refusals and the holder
        pass


def test_overwrite_empties_the_run_but_keeps_its_lock(tmp_path, small_run,
                                                      monkeypatch):
    """The lock file stays, so that a process waiting on it holds the
    same file as the next one."""
    run = _a_run(tmp_path / "run")
    (run / "checkpoints").mkdir()
    seen = []
    monkeypatch.setattr("coom.cli.train._train_in",
                        lambda run_dir, config: seen.append(
                            sorted(os.listdir(run_dir))) or 0)
    assert main(["train", "--run-dir", str(run), "--overwrite", "--set",
                 *small_run]) == 0
    assert seen == [["config.yaml", "lock", "run_info.json"]]


def test_a_run_directory_that_is_a_file_is_refused(tmp_path, capsys,
                                                   small_run):
    afile = tmp_path / "a-file"
    afile.write_text("")
    err = _one_error_line(capsys, ["train", "--run-dir", str(afile),
                                   "--set", *small_run])
    assert f"--run-dir {afile} is a file" in err
    err = _one_error_line(capsys, ["train", "--run-dir",
                                   str(afile / "run"), "--set", *small_run])
    assert f"cannot create the run directory {afile / 'run'}" in err
    assert "Not a directory" in err


def test_a_read_only_run_is_refused_on_resume(tmp_path, capsys,
                                              monkeypatch):
    """Tests run as root, whom file modes do not stop; os.access is what
    says a folder is read-only (also on a read-only mount)."""
    run = _a_run(tmp_path / "run")
    writable = os.access
    monkeypatch.setattr(run_files.os, "access", lambda path, mode: (
        mode != os.W_OK and writable(path, mode)))
    err = _one_error_line(capsys, ["train", "--resume", str(run)])
    assert f"cannot write in the run directory {run}" in err


def test_a_file_system_without_locks_does_not_stop_the_run(tmp_path,
                                                           monkeypatch):
    def unsupported(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(run_files.fcntl, "flock", unsupported)
    with hold_lock(tmp_path) as lock:
        assert not lock.closed
