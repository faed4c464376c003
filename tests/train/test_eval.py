"""``coom eval``: a checkpoint's validation loss, without training."""
import json

import pytest

from coom.cli import main
from coom.train.metrics import read_metrics


@pytest.fixture
def run(small_run, tmp_path):
    """A finished run of 6 steps, evaluated and saved at steps 3 and 6."""
    run_dir = tmp_path / "run"
    assert main(["train", "tiny", "--run-dir", str(run_dir), "--set",
                 *small_run]) == 0
    return run_dir


def _evaluated(run_dir, out, *arguments) -> float:
    assert main(["eval", str(run_dir), "--out", str(out), *arguments]) == 0
    return json.loads(out.read_text())["val_loss"]


def test_gives_the_loss_the_run_logged_at_that_step(run, tmp_path):
    logged = {record["step"]: record["val_loss"]
              for record in read_metrics(run) if "val_loss" in record}
    assert logged[3] != logged[6]
    before = (run / "metrics.jsonl").read_text()
    out = tmp_path / "eval.json"
    assert _evaluated(run, out, "--step", "3") == pytest.approx(
        logged[3], rel=1e-6)
    assert _evaluated(run, out) == pytest.approx(logged[6], rel=1e-6)
    # A kill between step 6's rename and the pointer's move left this.
    (run / "checkpoints" / "latest").write_text("step_0000003\n")
    assert _evaluated(run, out) == pytest.approx(logged[6], rel=1e-6)
    assert (run / "metrics.jsonl").read_text() == before


def test_takes_settings_that_change_the_numerics(run, tmp_path):
    """Emulated FP8 on a run trained without it: close to, not equal to,
    the run's own loss (they were 6e-5 apart when written)."""
    out = tmp_path / "eval.json"
    plain = _evaluated(run, out)
    fp8 = _evaluated(run, out, "--set", "fp8.recipe=blockwise",
                     "fp8.emulate=true")
    assert fp8 != plain
    assert fp8 == pytest.approx(plain, rel=1e-3)
    # What the run trained with stays on record: an evaluation writes
    # no products' record of its own.
    assert not (run / "fp8_products.json").exists()


def test_refuses_a_missing_checkpoint_plainly(run, tmp_path, capsys):
    assert main(["eval", str(run), "--step", "4"]) == 2
    error = capsys.readouterr().err
    assert "holds no checkpoint of step 4" in error
    assert "step_0000003, step_0000006" in error
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
