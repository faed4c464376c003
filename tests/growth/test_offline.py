"""``coom grow``: a run's model grown offline computes what it did, and
the folder it writes trains."""
import torch

from coom.cli import main
from coom.interop.weights import build_model, read_weights
from coom.train.metrics import read_metrics


def _logits(folder, tokens):
    with torch.no_grad():
        return build_model(read_weights(folder))(tokens)


def test_grown_folder_computes_the_same_and_trains(small_run, tmp_path,
                                                   capsys):
    run, out = tmp_path / "run", tmp_path / "grown"
    assert main(["train", "tiny", "--run-dir", str(run), "--set",
                 *small_run]) == 0
    assert main(["grow", str(run), str(out), "--op", "depth",
                 "num_layers=4", "method=identity", "--op", "width",
                 "hidden_size=40", "ffn_hidden_size=80"]) == 0
    assert "coom train" in capsys.readouterr().out
    grown = read_weights(out)
    assert (grown.config.num_layers, grown.config.hidden_size) == (4, 40)
    assert grown.tokenizer == out / "tokenizer.json"
    tokens = torch.randint(0, 512, (2, 32))
    before, after = _logits(run, tokens), _logits(out, tokens)
    assert ((after - before).abs().max() / before.abs().max()) < 1e-5
    again = tmp_path / "again"
    not_the_model = [item for item in small_run
                     if not item.startswith("model.")]
    assert main(["train", str(out / "recipe.yaml"), "--run-dir", str(again),
                 "--set", *not_the_model, "train.steps=2"]) == 0
    assert len([r for r in read_metrics(again) if "loss" in r]) == 2


def test_bad_operators_stop_before_writing(small_run, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "grown"
    assert main(["train", "tiny", "--run-dir", str(run), "--set",
                 *small_run, "train.steps=2"]) == 0
    assert main(["grow", str(run), str(out), "--op", "depth",
                 "num_layers"]) == 2
    assert main(["grow", str(run), str(out), "--op", "depth",
                 "num_layers=1"]) == 2
    error = capsys.readouterr().err
    assert "key=value" in error and "must exceed" in error
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["grow", str(run), str(out), "--op", "mtp",
                 "depths=2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
