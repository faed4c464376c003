"""``coom bench --energy-sweep``: candidates, the verdict, the recipe."""
import json
import time

import pytest

from coom.cli import main
from coom.config import load_config
from coom.energy.meter import EnergyMeter
from coom.tools import bench, sweep

MODEL = ["model.hidden_size=32", "model.num_layers=2",
         "model.num_attention_heads=2", "model.ffn_hidden_size=64",
         "model.vocab_size=300", "data.seq_length=32",
         "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.device=cpu"]
SWEEP = ["bench", "--energy-sweep", "--steps", "2", "--warmup", "1"]


def test_one_setting_at_a_time_or_all_combinations():
    axes = {"train.micro_batch_size": ["1", "2", "4"],
            "train.compile": ["false", "true"],
            "fp8.recipe": ["off", "blockwise"]}
    alone = sweep.candidates("tiny", MODEL, axes, grid=False)
    assert alone == [{}, {"train.micro_batch_size": "1"},
                     {"train.micro_batch_size": "4"},
                     {"train.compile": "true"}, {"fp8.recipe": "blockwise"}]
    grid = sweep.candidates("tiny", MODEL, axes, grid=True)
    assert len(grid) == 12 and grid[0] == {}
    assert {"train.micro_batch_size": "4", "train.compile": "true",
            "fp8.recipe": "blockwise"} in grid


def test_default_axes_on_a_cpu_vary_the_micro_batch_only():
    config = load_config("tiny", MODEL + ["train.global_batch_size=6"])
    assert sweep.default_axes(config) == {
        "train.micro_batch_size": ["1", "2"]}


def _row(name, joules_per_token, tokens_per_s, **extra):
    return {"overrides": {"train.micro_batch_size": name},
            "joules_per_token": joules_per_token,
            "tokens_per_s": tokens_per_s,
            "average_watts": joules_per_token * tokens_per_s} | extra


def test_choice_is_the_least_zeus_cost_on_the_front():
    rows = [_row("base", 0.0070, 100_000, power_limit_w=700.0),
            _row("a", 0.0060, 90_000, power_limit_w=700.0),
            _row("b", 0.0080, 110_000, power_limit_w=700.0),
            _row("c", 0.0075, 95_000, power_limit_w=700.0),
            {"overrides": {"x": "1"}, "error": "out of memory"}]
    frugal = sweep.choose(rows, eta=1.0)
    assert [r["overrides"]["train.micro_batch_size"] for r in frugal.front
            ] == ["b", "base", "a"]
    assert frugal.best is rows[1] and frugal.max_power_w == 700.0
    assert sweep.choose(rows, eta=0.0).best is rows[2]
    balanced = sweep.choose(rows, eta=0.5)
    costs = {id(r): 0.5 * r["joules_per_token"]
             + 0.5 * 700 / r["tokens_per_s"] for r in rows[:4]}
    assert id(balanced.best) == min(costs, key=costs.get)
    text = sweep.describe_sweep(rows, balanced)
    assert "failed: out of memory" in text and "against the recipe's" in text


def test_without_a_power_limit_time_is_priced_at_the_highest_power():
    rows = [_row("base", 0.007, 100_000), _row("a", 0.006, 90_000)]
    choice = sweep.choose(rows, eta=0.5)
    assert choice.max_power_w == max(r["average_watts"] for r in rows)
    assert "highest mean power" in choice.max_power_source
    assert sweep.choose(rows, 0.5, max_power_w=300.0).max_power_w == 300.0
    unmetered = [{"overrides": {}, "tokens_per_s": 5.0}]
    assert sweep.choose(unmetered, eta=0.5) is None


def test_sweep_on_a_cpu_without_meters_reports_speed_only(tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep.json"
    assert main(SWEEP + ["--out", str(out), "--set", *MODEL]) == 0
    printed = capsys.readouterr().out
    assert "energy not measured" in printed and "no recipe" in printed
    assert not list(tmp_path.glob("*.yaml"))
    result = json.loads(out.read_text())
    sizes = [r["overrides"] for r in result["candidates"]]
    assert sizes == [{}, {"train.micro_batch_size": "1"},
                     {"train.micro_batch_size": "4"}]
    assert all(r["tokens_per_s"] > 0 for r in result["candidates"])
    assert result["front"] == [] and result["best"] is None


class PowerMeter:
    """A meter drawing a steady 100 W: energy is proportional to time."""

    def __init__(self):
        self.started = time.perf_counter()

    def joules(self) -> float:
        return 100.0 * (time.perf_counter() - self.started)


def test_metered_sweep_writes_the_best_setting_as_a_recipe(
        tmp_path, capsys, monkeypatch):
    """At a steady power, energy is proportional to time: the front is
    the fastest setting alone, and it is the best for any eta."""
    monkeypatch.setattr(bench, "open_meter", lambda device, machine_leader:
                        EnergyMeter({"gpu": [PowerMeter()]}, {}, True))
    recipe, out = tmp_path / "best.yaml", tmp_path / "sweep.json"
    assert main(SWEEP + ["--eta", "0.5", "--recipe-out", str(recipe),
                         "--out", str(out), "--set", *MODEL]) == 0
    printed = capsys.readouterr().out
    assert "best for eta 0.5" in printed and "highest mean power" in printed
    result = json.loads(out.read_text())
    fastest = max(result["candidates"], key=lambda r: r["tokens_per_s"])
    assert result["front"] == [result["best"]] == [
        sweep.label(fastest["overrides"])]
    assert all(r["joules_per_token"] == pytest.approx(
        100 / r["tokens_per_s"], rel=0.2) for r in result["candidates"])
    config = load_config(str(recipe))
    assert config.model.hidden_size == 32
    assert config.train.micro_batch_size == int(fastest["overrides"].get(
        "train.micro_batch_size", 2))
    assert "coom bench --energy-sweep" in recipe.read_text()
    assert main(SWEEP + ["--recipe-out", str(recipe), "--set", *MODEL]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("option, words", [
    (["--vary", "train.micro_batch_size=3"], "micro_batch_size"),
    (["--vary", "train.micro_batch_size"], "--vary"),
    (["--eta", "1.5"], "--eta")])
def test_bad_sweep_options_stop_before_measuring(option, words, capsys):
    assert main(SWEEP + option + ["--set", *MODEL]) == 2
    assert words in capsys.readouterr().err
