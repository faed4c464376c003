"""Integration tests: short real runs through the ``coom`` command."""
import gc
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from coom.checkpoint.storage import latest_checkpoint, load_checkpoint
from coom.cli import main
from coom.config import load_config
from coom.data.tokenizer import train_bpe
from coom.parallel.mesh import World
from coom.train.metrics import read_metrics
from coom.train.trainer import Trainer
from tests.launch import command, launch


def _train(run_dir, overrides, *extra) -> int:
    return main(["train", "tiny", "--run-dir", str(run_dir), *extra,
                 "--set", *overrides])


def test_run_writes_metrics_config_info_checkpoints_and_report(
        small_run, tmp_path):
    run = tmp_path / "run"
    assert _train(run, small_run + ["logging.tensorboard=true"]) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    for record in records[1:]:
        assert {"loss", "lr", "tokens_per_s", "grad_norm", "aux_loss",
                "moe_max_vio", "moe_dead_experts_layer1", "mtp_loss",
                "mtp_weight", "moe_max_vio_layer2"} <= set(record)
        assert record["mtp_loss"] > 0
        assert record["tokens_per_s"] > 0
        load = record["moe_load_layer1"]
        assert len(load) == 8 and sum(load) == 4 * 32 * 2
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["vocab_size"] == 512
    assert config["data"]["tokenizer"] == "tokenizer.json"
    info = json.loads((run / "run_info.json").read_text())
    assert info["versions"]["megatron-core"] == "0.16.1"
    assert info["git_sha"] and info["machine"]["cpu_count"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert latest_checkpoint(run / "checkpoints").name == "step_0000006"
    assert main(["report", str(run)]) == 0
    for name in ("loss.png", "tokens_per_s.png", "lr.png", "max_vio.png",
                 "summary.md"):
        assert (run / "report" / name).stat().st_size > 0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="a GPU's allocated memory")
def test_gpu_runs_log_the_most_memory_held(small_run, tmp_path):
    """Each logged step's max_memory_gib is the peak since the last log:
    above the float32 weights, below the GPU's memory."""
    run = tmp_path / "run"
    assert _train(run, small_run + ["train.device=cuda"]) == 0
    weights = sum(tensor.numel() for tensor in load_checkpoint(
        latest_checkpoint(run / "checkpoints"))["model"].values()) * 4
    total = torch.cuda.get_device_properties(0).total_memory
    for record in read_metrics(run)[1:]:
        assert weights < record["max_memory_gib"] * 2 ** 30 < total


def test_training_lowers_the_validation_loss(small_run, tmp_path):
    run = tmp_path / "run"
    # About half the documents validate, so that code (not only the
    # multilingual lines at the end of the corpus) is in the validation
    # split: the last 14 of the 46 non-empty files and those lines (the
    # empty files hold no document).
    longer = small_run + ["train.steps=30", "train.eval_interval=10",
                          "train.micro_batch_size=8",
                          "train.global_batch_size=8", "data.split=48,52,0",
                          "optimizer.lr=1e-2", "optimizer.min_lr=1e-3"]
    assert _train(run, longer) == 0
    valid = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert valid[-1] < valid[0] - 0.5


@pytest.mark.parametrize("precision", [
    [], ["train.precision=bf16", "train.micro_batch_size=4"]],
    ids=["fp32", "bf16-one-micro-batch"])
def test_resumed_run_is_bitwise_equal_to_uninterrupted(small_run, tmp_path,
                                                       precision):
    """Also in bf16 with one micro-batch a step, whose gradients stay on
    the compute copies: the optimizer's state is restored all the
    same."""
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    small_run = small_run + precision
    assert _train(straight, small_run) == 0
    assert _train(pieces, small_run + ["train.exit_interval=2"]) == 0
    assert latest_checkpoint(pieces / "checkpoints").name == "step_0000002"
    assert main(["train", "--resume", str(pieces), "--set",
                 "train.exit_interval=null"]) == 0
    expected = read_metrics(straight)
    resumed = read_metrics(pieces)
    assert len(resumed) == len(expected) == 7
    for ours, theirs in zip(resumed, expected):
        for key in ("step", "loss", "lr", "grad_norm", "val_loss",
                    "consumed_samples"):
            assert ours.get(key) == theirs.get(key), (key, ours["step"])
    final = [load_checkpoint(latest_checkpoint(run / "checkpoints"))["model"]
             for run in (straight, pieces)]
    biases = [name for name in final[0] if name.endswith("router.bias")]
    assert biases
    for name in biases:
        assert final[0][name].abs().sum() > 0
        assert torch.equal(final[0][name], final[1][name])


def test_a_moved_run_resumes_and_evaluates_from_another_folder(
        small_run, tmp_path, monkeypatch):
    """Launched from one folder with a relative --run-dir, stopped at
    step 3 by a kill before its first pointer move (no ``latest``),
    moved, then resumed and evaluated from elsewhere by its absolute
    path."""
    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    launch.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(launch)
    assert _train("runs/r", small_run + ["train.exit_interval=3"]) == 0
    (launch / "runs/r/checkpoints/latest").unlink()
    moved = tmp_path / "moved"
    (launch / "runs/r").rename(moved)
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(moved), "--out", "eval.json"]) == 0
    assert json.loads((elsewhere / "eval.json").read_text())[
        "checkpoint"] == str(moved / "checkpoints/step_0000003")
    assert main(["train", "--resume", str(moved), "--set",
                 "train.exit_interval=null"]) == 0
    steps = [record["step"] for record in read_metrics(moved)]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    assert latest_checkpoint(moved / "checkpoints").name == "step_0000006"
    info = json.loads((moved / "run_info.json").read_text())
    assert len(info["resumes"]) == 1


def test_a_run_killed_while_preparing_its_data_resumes(small_run,
                                                       tmp_path,
                                                       monkeypatch):
    run = tmp_path / "run"

    def killed(config):
        raise KeyboardInterrupt
    monkeypatch.setattr("coom.train.run_data.prepare", killed)
    assert _train(run, small_run) == 130
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert latest_checkpoint(run / "checkpoints").name == "step_0000006"
    assert [r["step"] for r in read_metrics(run)] == list(range(7))


def test_expert_bias_balances_the_load(small_run, tmp_path):
    """MaxVio of the tiny preset's model with the auxiliary-loss-free bias
    on and off, over a short run with the sequence-wise loss off."""
    data = [item for item in small_run if item.startswith("data.")]
    max_vio = {}
    for enabled in ("true", "false"):
        run = tmp_path / enabled
        overrides = data + [
            "data.seq_length=128", "data.split=90,10,0", "train.steps=40",
            "train.micro_batch_size=8", "train.global_batch_size=8",
            "train.eval_interval=40", "train.eval_iters=1",
            "schedule.lr_warmup_iters=5", "logging.log_interval=1",
            "logging.tensorboard=false", "logging.progress_bar=false",
            "model.moe_seq_aux_loss_coeff=0.0",
            f"model.moe_router_enable_expert_bias={enabled}"]
        assert _train(run, overrides) == 0
        last = [r["moe_max_vio"] for r in read_metrics(run)[-10:]]
        max_vio[enabled] = sum(last) / len(last)
    print(f"MaxVio over the last 10 of 40 steps: bias on "
          f"{max_vio['true']:.3f}, off {max_vio['false']:.3f}")
    assert max_vio["true"] < 0.5 * max_vio["false"]


def test_compiled_dense_run_traces_whole_blocks_and_matches_eager(
        small_run, tmp_path):
    """With train.compile, each block is one graph from its first call
    (the step-0 evaluation, under no_grad) on; a graph break there can
    make torch.compile give the block up for the whole run. Dense blocks
    only: on CPUs the routed experts' products loop over the experts
    (``coom.layers.moe``), which breaks the graph by design."""
    dense = ["model.n_routed_experts=0"]
    losses = {}
    for compile_ in ("false", "true"):
        torch._dynamo.reset()
        counters.clear()
        run = tmp_path / compile_
        assert _train(run, small_run + dense
                      + [f"train.compile={compile_}"]) == 0
        losses[compile_] = [r["loss"] for r in read_metrics(run)
                            if "loss" in r]
        assert not counters["graph_break"]
        assert counters["frames"]["ok"] == counters["frames"]["total"]
    assert counters["stats"]["unique_graphs"] > 0
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_gradient_accumulation_matches_one_micro_batch(small_run, tmp_path):
    """Each step, from the same weights, optimizer state and data
    position, gives the same loss and gradient norm in two micro-batches
    as in one, to float32's summation order.

    Two whole runs would drift apart instead: Adam's first updates act on
    the gradient's sign, so summation-order differences of 2e-7 after
    step 1 grow to weights 1e-5 apart by step 5, and this run's step 6,
    a gradient spike, amplifies that to gradients 2.5e-4 apart.
    """
    trainers = []
    for micro_batch in (2, 4):
        run_dir = tmp_path / f"micro-batch-{micro_batch}"
        run_dir.mkdir()
        config = load_config("tiny", small_run + [
            f"train.micro_batch_size={micro_batch}"])
        trainers.append(Trainer(config, run_dir))
    accumulated, whole = trainers
    for _ in range(6):
        accumulated.model.load_state_dict(whole.model.state_dict())
        accumulated.optimizer.load_state_dict(whole.optimizer.state_dict())
        ours, theirs = accumulated.train_step(), whole.train_step()
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"],
                                                  rel=1e-6)


def test_sigterm_checkpoints_and_exits_cleanly(small_run, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "coom", "train", "tiny", "--run-dir",
               str(run), "--set", *small_run, "train.steps=5000",
               "train.eval_interval=5000", "checkpoint.interval=5000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "stopped at step" in out and "SIGTERM" in out
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert state["step"] == read_metrics(run)[-1]["step"]
    assert state["step"] >= 3
    assert "Traceback" not in err


# A run of the tiny model on random tokens, cheap enough to launch
# under torchrun.
SYNTHETIC = ["train.device=cpu", "data.synthetic=true",
             "model.vocab_size=512", "data.seq_length=32",
             "model.num_layers=2", "model.hidden_size=32",
             "model.num_attention_heads=2", "model.ffn_hidden_size=64",
             "train.micro_batch_size=1", "train.global_batch_size=2",
             "schedule.lr_warmup_iters=1", "logging.progress_bar=false",
             "logging.tensorboard=false", "logging.log_interval=1"]


BAD_LAYOUT = ("config field model.num_attention_heads: 2 does not split "
              "over parallel.tensor 3")


def test_a_bad_layout_under_torchrun_is_said_once(tmp_path):
    """Every process meets it; the first says it. (What torchrun prints
    of its processes' failure is its own.)"""
    result = launch(2, "train", "tiny", "--run-dir", str(tmp_path),
                    "--set", *SYNTHETIC, "parallel.tensor=3", timeout=300)
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("coom: error:")]
    assert errors == [f"coom: error: {BAD_LAYOUT}"], result.stderr
    assert re.search(r"exitcode\s*: 2 ", result.stderr)


def test_the_other_processes_of_a_launch_exit_2_silently(
        tmp_path, monkeypatch, capsys):
    """torchrun stops the others once one has failed, so the launch
    above cannot show each one's exit code."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _train(tmp_path, SYNTHETIC + ["parallel.tensor=3"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert _train(tmp_path, SYNTHETIC + ["parallel.tensor=3"]) == 2
    assert capsys.readouterr().err == f"coom: error: {BAD_LAYOUT}\n"


def _children(pid: int) -> list[int]:
    return [int(child) for path in glob.glob(f"/proc/{pid}/task/*/children")
            for child in open(path).read().split()]


def test_sigterm_under_torchrun_checkpoints_exits_0_and_says_how_to_resume(
        tmp_path):
    """SIGTERM to each process (as a scheduler sends it): all stop after
    one step, write its checkpoint and exit with 0, so torchrun does;
    the resume it prints is a torchrun launch again."""
    run = tmp_path / "run"
    process = subprocess.Popen(
        command(2, "train", "tiny", "--run-dir", str(run), "--set",
                *SYNTHETIC, "train.steps=5000", "train.eval_interval=5000",
                "checkpoint.interval=5000"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"})
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    for child in _children(process.pid):
        os.kill(child, signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    step = read_metrics(run)[-1]["step"]
    assert f"stopped at step {step} (SIGTERM)" in out
    assert (f"continue with: torchrun --nproc-per-node 2 -m coom train "
            f"--resume {run}") in out
    assert latest_checkpoint(run / "checkpoints").name == f"step_{step:07d}"
    assert "Traceback" not in err


def _fails_cleanly(capsys, argv, *words) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.replace("\r", "\n")
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    err = errors[0]
    assert err.startswith("coom: error:")
    for word in words:
        assert word in err, err


def test_a_failing_run_frees_its_trainer_before_the_world_closes(
        small_run, tmp_path, monkeypatch):
    """World.close collects garbage so that no process group is left to
    the interpreter's exit; the exception's traceback must not keep the
    trainer (its model, their process groups) alive through it."""
    trainers, alive_at_close = [], []

    def failing_run(self):
        trainers.append(weakref.ref(self))
        raise RuntimeError("a failure inside the run")

    def close(self):
        gc.collect()
        alive_at_close.append(trainers[0]() is not None)

    monkeypatch.setattr(Trainer, "run", failing_run)
    monkeypatch.setattr(World, "close", close)
    with pytest.raises(RuntimeError, match="a failure inside the run"):
        _train(tmp_path / "run", small_run)
    assert alive_at_close == [False]


def test_existing_run_directory_is_refused(small_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, small_run) == 0
    before = (run / "metrics.jsonl").read_bytes()
    _fails_cleanly(capsys, ["train", "--run-dir", str(run), "--set",
                            *small_run], "already exists", "--resume",
                   "--overwrite")
    assert (run / "metrics.jsonl").read_bytes() == before
    assert _train(run, small_run, "--overwrite") == 0


def test_resume_with_another_model_shape_is_refused(small_run, tmp_path,
                                                    capsys):
    run = tmp_path / "run"
    assert _train(run, small_run + ["train.exit_interval=3"]) == 0
    _fails_cleanly(capsys, ["train", "--resume", str(run), "--set",
                            "model.hidden_size=64"],
                   "different model", "step_0000003")
    other = train_bpe(["some other text"] * 50, 300,
                      tmp_path / "other" / "tokenizer.json")
    _fails_cleanly(capsys, ["train", "--resume", str(run), "--set",
                            f"data.tokenizer={other.path}"],
                   "another tokenizer")
    assert latest_checkpoint(run / "checkpoints").name == "step_0000003"


def test_run_with_a_tokenizer_that_ends_documents_with_eos(
        small_run, tmp_path, capsys):
    """A tokenizer_config.json names the end token; the run keeps only
    tokenizer.json, so its config names the token for resume and
    generate."""
    folder = tmp_path / "llama"
    train_bpe(["some text to tokenize"] * 50, 300,
              folder / "tokenizer.json", "</s>")
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    run = tmp_path / "run"
    assert _train(run, small_run + [f"data.tokenizer={folder}/tokenizer.json",
                                    "train.exit_interval=3"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["eod_token"] == "</s>"
    assert main(["train", "--resume", str(run)]) == 0
    assert latest_checkpoint(run / "checkpoints").name == "step_0000006"
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "some",
                 "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("some")


def test_model_vocabulary_smaller_than_tokenizer_is_refused(
        small_run, tmp_path, capsys):
    _fails_cleanly(capsys, ["train", "--run-dir", str(tmp_path / "r"),
                            "--set", *small_run, "model.vocab_size=100"],
                   "model.vocab_size", "512")


def test_missing_data_is_refused(small_run, tmp_path, capsys):
    _fails_cleanly(capsys, ["train", "--run-dir", str(tmp_path / "r"),
                            "--set", *small_run,
                            "data.paths=[/missing/corpus.jsonl]"],
                   "/missing/corpus.jsonl", "does not exist")


def test_resume_of_a_folder_that_is_no_run(tmp_path, capsys):
    _fails_cleanly(capsys, ["train", "--resume", str(tmp_path)],
                   "not a run directory")


def test_errors_print_one_line_without_traceback(small_run, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "coom", "train", "--run-dir",
         str(tmp_path / "r"), "--set", "model.qk_rope_head_dim=15"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "coom: error: config field model.qk_rope_head_dim: 15 must be even "
        "for rotary pairs")
    debug = subprocess.run(
        [sys.executable, "-m", "coom", "--debug", "train", "--set",
         "model.qk_rope_head_dim=15"],
        capture_output=True, text=True, timeout=120)
    assert "Traceback" in debug.stderr


@pytest.mark.parametrize("argv", [
    ["--help"], ["train", "--help"], ["data", "--help"],
    ["data", "prepare", "--help"], ["report", "--help"], ["grow", "--help"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 0
    assert "usage: coom" in capsys.readouterr().out
