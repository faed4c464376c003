"""Growth in flight, through ``coom train``: the grown checkpoint computes
what the one before it did, a run stopped before or after a growth
resumes to the same losses, training goes on falling after growth, and a
schedule that cannot apply is refused before any work."""
import weakref

import pytest
import torch

from coom.checkpoint.storage import latest_checkpoint
from coom.cli import main
from coom.growth.schedule import GROWN
from coom.interop.weights import build_model, read_weights
from coom.train import lifecycle
from coom.train.metrics import read_metrics
from coom.train.trainer import Trainer

SCHEDULE = ("growth.schedule=["
            "{step: 2, op: depth, args: {num_layers: 3}}, "
            "{step: 4, op: width, args: {hidden_size: 48}}, "
            "{step: 4, op: add_experts, args: {n_routed_experts: 10}}]")


def _train(run_dir, overrides, *extra) -> int:
    return main(["train", "tiny", "--run-dir", str(run_dir), *extra,
                 "--set", *overrides])


def _resume(run_dir, *overrides) -> int:
    return main(["train", "--resume", str(run_dir), "--set", *overrides])


def _logits(checkpoint, tokens) -> torch.Tensor:
    model = build_model(read_weights(checkpoint))
    with torch.no_grad():
        return model(tokens)


def test_growth_in_flight_resumes_exactly_and_keeps_the_function(
        small_run, tmp_path, capsys):
    overrides = small_run + [SCHEDULE, "checkpoint.keep=10"]
    straight, early, late = (tmp_path / name
                             for name in ("straight", "early", "late"))
    assert _train(straight, overrides) == 0
    # The energy line comes once, at the end, not from each grown
    # trainer (unmetered here, the run announces no meters at its start).
    said = capsys.readouterr()
    assert "energy" not in said.err and said.out.count("energy:") == 1
    # Stopped with step 2's checkpoint saved and not yet grown, and
    # stopped after step 3, between the two growths.
    assert _train(early, overrides + ["train.exit_interval=2"]) == 0
    assert latest_checkpoint(early / "checkpoints").name == "step_0000002"
    assert _train(late, overrides + ["train.exit_interval=3"]) == 0
    for run in (early, late):
        assert _resume(run, "train.exit_interval=null") == 0
    expected = read_metrics(straight)
    assert [r.get("growth") for r in expected if "growth" in r] == [
        ["depth num_layers=3"],
        ["width hidden_size=48", "add_experts n_routed_experts=10"]]
    for run in (early, late):
        records = read_metrics(run)
        assert len(records) == len(expected) == 7
        for ours, theirs in zip(records, expected):
            for key in ("loss", "grad_norm", "val_loss", "train_flops",
                        "consumed_samples", "growth"):
                assert ours.get(key) == theirs.get(key), (key, ours["step"])
    assert main(["report", str(straight)]) == 0
    summary = (straight / "report" / "summary.md").read_text()
    assert "grown after step 2: depth num_layers=3" in summary
    flops = [r["train_flops"] for r in expected[1:]]
    steps = [b - a for a, b in zip([0.0] + flops, flops)]
    assert steps[0] == steps[1] < steps[2] == steps[3] < steps[4]
    tokens = torch.randint(0, 512, (2, 32))
    folder = straight / "checkpoints"
    for step in (2, 4):
        before = _logits(folder / f"step_{step:07d}", tokens)
        after = _logits(folder / f"step_{step:07d}{GROWN}", tokens)
        error = (after - before).abs().max() / before.abs().max()
        assert error < 1e-5


def test_loss_keeps_falling_after_growth(corpus_dir, tmp_path_factory,
                                         tmp_path):
    """The tiny preset's model (on a smaller vocabulary and shorter
    sequences) grown deeper and wider after step 20, beside the same run
    without growth: step 21's loss, the first of the grown model, is the
    same, and the grown run goes on falling, with no spike."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    overrides = [
        f"data.paths=[{corpus_dir}]", f"data.cache_dir={cache}",
        "data.tokenizer_vocab_size=512", "data.seq_length=64",
        "data.split=90,10,0", "train.steps=40", "train.micro_batch_size=8",
        "train.global_batch_size=8", "train.eval_interval=40",
        "train.eval_iters=2", "schedule.lr_warmup_iters=5",
        "logging.log_interval=1", "logging.tensorboard=false",
        "logging.progress_bar=false"]
    growth = ("growth.schedule=[{step: 20, op: depth, args: {num_layers: 6}},"
              " {step: 20, op: width, args: {hidden_size: 320, "
              "moe_intermediate_size: 160}}]")
    runs = {}
    for name, extra in (("fixed", []), ("grown", [growth])):
        assert _train(tmp_path / name, overrides + extra) == 0
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name)
                      if "loss" in r]
    fixed, grown = runs["fixed"], runs["grown"]
    assert grown[:20] == fixed[:20]
    assert abs(grown[20] - fixed[20]) < 1e-5 * fixed[20]
    noise = torch.tensor(fixed[10:]).diff().abs().mean().item()
    assert all(ours < theirs + noise
               for ours, theirs in zip(grown[21:], fixed[21:]))
    assert sum(grown[30:]) / 10 < sum(grown[10:20]) / 10 - 0.3


def test_each_trainer_is_freed_before_the_next_is_built(
        small_run, tmp_path, monkeypatch):
    """A growth ends a trainer; its model, optimizer and their memory are
    gone before the next trainer builds the grown model, and the last
    is gone when the run returns."""
    built = []

    class Watched(Trainer):
        def __init__(self, *args, **kwargs):
            assert all(ref() is None for pair in built for ref in pair)
            super().__init__(*args, **kwargs)
            built.append((weakref.ref(self), weakref.ref(self.model)))

    monkeypatch.setattr(lifecycle, "Trainer", Watched)
    assert _train(tmp_path / "run", small_run + [SCHEDULE]) == 0
    assert len(built) == 3
    assert all(ref() is None for pair in built for ref in pair)


@pytest.mark.parametrize("schedule, words", [
    ("[{step: 2, op: depth, args: {num_layers: 1}}]", "must exceed"),
    ("[{step: 2, op: width, args: {q_lora_rank: 64}}]", "unset"),
])
def test_a_schedule_that_cannot_apply_is_refused_first(
        small_run, tmp_path, capsys, schedule, words):
    run = tmp_path / "run"
    overrides = small_run + [f"growth.schedule={schedule}"]
    assert _train(run, overrides) == 2
    error = capsys.readouterr().err
    assert "growth.schedule[0]" in error and words in error
    assert not (run / "checkpoints").exists()


def test_resume_with_another_schedule_is_refused(small_run, tmp_path,
                                                 capsys):
    run = tmp_path / "run"
    overrides = small_run + [SCHEDULE, "train.exit_interval=3"]
    assert _train(run, overrides) == 0
    other = "[{step: 2, op: depth, args: {num_layers: 4}}]"
    assert _resume(run, f"growth.schedule={other}") == 2
    assert "growth.schedule" in capsys.readouterr().err
