"""The command line: arguments, warnings and one-line errors."""
import pytest

from coom.cli import main


def _error_line(capsys) -> str:
    """The one error line a failed command ends with (progress bars may
    come before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert line.startswith("coom: error: ") and err.endswith(line + "\n")
    return line


def test_a_recipe_named_after_set_is_the_recipe(capsys):
    assert main(["model", "info", "--set", "model.num_layers=3",
                 "small"]) == 0
    assert capsys.readouterr().out.startswith("recipe small")


def test_an_adjusted_value_is_one_warning_line(capsys):
    assert main(["model", "info", "tiny", "--set", "train.steps=4"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines()
               if "warning" in line]
    assert warning == ["coom: warning: schedule.lr_warmup_iters 30 exceeds "
                       "train.steps 4; warming up over all 4 steps"]


@pytest.mark.parametrize("text, words", [
    (b"model:\n  hidden_size: \xff\n", "is not UTF-8 text"),
    (b"model: [\n", "is not valid YAML"),
    (b"base: ../../missing/recipe\n", "unknown recipe"),
    (b"base: ../missing.yaml\n", "does not exist"),
])
def test_bad_recipe_files_are_one_line(text, words, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text)
    assert main(["model", "info", str(recipe)]) == 2
    assert words in _error_line(capsys)


def test_malformed_set_value_is_one_line(capsys):
    assert main(["model", "info", "tiny", "--set", "data.paths=[a"]) == 2
    line = _error_line(capsys)
    assert "data.paths" in line and "not valid YAML" in line


@pytest.mark.parametrize("size", ["model.vocab_size=1099511627776",
                                  "model.hidden_size=1048576"])
def test_a_model_too_large_for_memory_is_one_line(size, small_run, tmp_path,
                                                  capsys):
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--set",
                 *small_run, size]) == 2
    line = _error_line(capsys)
    assert "config field model:" in line and "GiB free on cpu" in line
