"""Budgets end short real runs (tiny preset, random tokens) with a
checkpoint; a fake meter stands in for the hardware."""
import json

import pytest

from coom.checkpoint.storage import latest_checkpoint
from coom.cli import main
from coom.energy import ledger
from coom.energy.ledger import JOULES_PER_KWH
from coom.energy.meter import EnergyMeter

ARGS = ["train.device=cpu", "train.precision=fp32", "train.steps=6",
        "train.micro_batch_size=1", "train.global_batch_size=2",
        "schedule.lr_warmup_iters=1", "train.eval_interval=100",
        "train.eval_iters=1", "logging.log_interval=1",
        "logging.tensorboard=false", "logging.progress_bar=false",
        "checkpoint.interval=100", "data.synthetic=true",
        "model.vocab_size=512", "data.seq_length=32", "model.num_layers=2"]
JOULES_PER_READ = 0.25 * JOULES_PER_KWH


class Ticking:
    """A GPU that has used JOULES_PER_READ more at every read."""

    def __init__(self):
        self.total = 0.0

    def joules(self) -> float:
        self.total += JOULES_PER_READ
        return self.total


@pytest.fixture
def hungry_gpu(monkeypatch):
    monkeypatch.setattr(ledger, "open_meter", lambda device, leader:
                        EnergyMeter({"gpu": [Ticking()]}, {}, leader))


def _train(run, *overrides):
    return main(["train", "tiny", "--run-dir", str(run), "--set", *ARGS,
                 *overrides])


def _records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_energy_budget_checkpoints_and_stops(hungry_gpu, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "energy.budget_kwh=1.6") == 0
    said = capsys.readouterr()
    records = _records(run)
    stopped = records[-1]["step"]
    assert stopped < 6
    assert records[-1]["energy_kwh"] >= 1.6 > records[-2]["energy_kwh"]
    assert latest_checkpoint(run / "checkpoints").name == \
        f"step_{stopped:07d}"
    assert f"stopped at step {stopped} (energy budget reached" in said.out
    assert "energy: " in said.out and "kg CO2e" in said.out

    assert main(["train", "--resume", str(run)]) == 0
    assert "energy budget reached" in capsys.readouterr().out
    assert _records(run)[-1]["step"] == stopped

    assert main(["train", "--resume", str(run), "--set",
                 "energy.budget_kwh=100"]) == 0
    records = _records(run)
    assert records[-1]["step"] == 6
    assert records[-1]["energy_kwh"] > records[stopped - 1]["energy_kwh"]

    assert main(["report", str(run)]) == 0
    said = capsys.readouterr().out
    assert "- energy: " in said and "J/token in steps" in said
    for name in ("joules_per_token.png", "energy_kwh.png"):
        assert (run / "report" / name).stat().st_size > 0


def test_time_budget_checkpoints_and_stops(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "train.exit_duration_in_mins=1e-6") == 0
    said = capsys.readouterr()
    assert "stopped at step 1 (time budget reached" in said.out
    assert latest_checkpoint(run / "checkpoints").name == "step_0000001"
    assert "energy" not in said.err
    (line,) = [line for line in said.out.splitlines()
               if line.startswith("energy:")]
    assert line.startswith("energy: not measured (") and len(line) < 100
    assert all(r["energy_kwh"] is None for r in _records(run))
