"""``coom report`` on run directories written here, without training."""
import json

import pytest
from matplotlib.figure import Figure

from coom.cli import main
from coom.config import load_config
from coom.train.run_dir import write_config


def _record(step: int) -> str:
    return json.dumps({"step": step, "loss": 5.0 - step, "lr": 1e-3,
                       "tokens_per_s": 100.0, "val_loss": 5.5 - step})


@pytest.fixture
def run(tmp_path):
    """A run directory of three steps, as coom train leaves it."""
    write_config(tmp_path, load_config("tiny"))
    lines = [json.dumps({"step": 0, "val_loss": 6.0}),
             *(_record(step) for step in (1, 2, 3))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_a_line_cut_short_is_skipped_with_a_warning(run, capsys):
    """A kill mid-write leaves a partial line, which the resumed run's
    next record then follows on the same line."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20] + _record(2)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"warning: {run / 'metrics.jsonl'} line 3 "
                            "holds no metrics record; skipped\n")
    assert "- steps: 3 of 300" in captured.out
    assert "final training loss: 2.0000" in captured.out


def test_a_read_only_run_is_refused_in_one_line(run, capsys, monkeypatch):
    """Tests run as root, whom file modes do not stop: the write fails
    as it would in a read-only folder."""
    def refused(self, path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(Figure, "savefig", refused)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == (f"coom: error: cannot write the report in "
                   f"{run / 'report'} (Permission denied); make {run} "
                   "writable, or report on a copy of it\n")


def test_languages_are_plotted(run, capsys):
    """A run whose sources name languages: each language's validation
    bits per byte, and the mixture plan's shares."""
    lines = [json.dumps({"step": step, "val_loss": 5.0,
                         "val_bpb/en": 1.0 - step / 10,
                         "val_bpb/sw": 1.5 - step / 10})
             for step in (0, 3)]
    with open(run / "metrics.jsonl", "a") as file:
        file.write("\n".join(lines) + "\n")
    (run / "mixture.json").write_text(json.dumps({"phases": [
        {"step": 0, "steps": 2, "plan": "unimax", "languages": {
            "en": {"tokens": 1000, "share": 0.6, "epochs": 1.0},
            "sw": {"tokens": 10, "share": 0.4, "epochs": 4.0}}},
        {"step": 2, "steps": 2, "plan": "proportional", "languages": {
            "en": {"tokens": 1000, "share": 0.99, "epochs": 1.0},
            "sw": {"tokens": 10, "share": 0.01, "epochs": 1.0}}}]}))
    assert main(["report", str(run)]) == 0
    summary = capsys.readouterr().out
    for name in ("val_bpb_by_language", "mixture"):
        assert (run / "report" / f"{name}.png").stat().st_size > 0
        assert f"![{name}]({name}.png)" in summary
