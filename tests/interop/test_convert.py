"""coom convert and coom.load_model on a real (very small) run."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import coom
from coom.cli import main
from coom.config import ModelConfig, load_config
from coom.data.tokenizer import Tokenizer
from coom.errors import UserError
from coom.interop.convert import write_model_folder
from coom.interop.weights import Weights
from coom.models import Transformer
from coom.train.metrics import read_metrics


def _train(run, overrides) -> int:
    return main(["train", "--run-dir", str(run), "--set", *overrides])


def test_run_to_hf_and_back_to_training(small_run, tmp_path, capsys):
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    assert _train(run, small_run) == 0
    assert main(["convert", "--to", "hf", str(run), str(hf_dir)]) == 0
    # transformers reads the run's tokenizer, its end of document too.
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer("hello world")["input_ids"] == \
        Tokenizer(hf_dir / "tokenizer.json").encode("hello world")
    ours = coom.load_model(run)
    hf = AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    tokens = torch.randint(0, 512, (2, 32),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() <= 1e-4

    imported = tmp_path / "imported"
    assert main(["convert", "--from", "hf", str(hf_dir),
                 str(imported)]) == 0
    out = capsys.readouterr().out
    assert "coom train" in out and "COOM's defaults" not in out
    # The tiny recipe's bias rate (not the default) survives the trip.
    recipe = load_config(str(imported / "recipe.yaml"))
    assert Tokenizer(recipe.data.tokenizer).eod_token == "<|endoftext|>"
    assert (imported / "tokenizer_config.json").is_file()
    assert recipe.model.moe_router_bias_update_rate == 0.01
    again = coom.load_model(imported)
    for (name, mine), theirs in zip(ours.state_dict().items(),
                                    again.state_dict().values()):
        assert torch.equal(mine, theirs), name
    assert len(again.mtp) == 1

    # Training from the import starts where the first run ended.
    second = tmp_path / "second"
    keep = [item for item in small_run if not item.startswith("model.")]
    assert main(["train", str(imported / "recipe.yaml"), "--run-dir",
                 str(second), "--set", *keep]) == 0
    first_val = read_metrics(run)[-1]["val_loss"]
    assert read_metrics(second)[0]["val_loss"] == pytest.approx(
        first_val, rel=1e-6)


def test_init_from_another_model_names_the_fields(small_run, tmp_path,
                                                  capsys):
    run = tmp_path / "run"
    assert _train(run, small_run) == 0
    assert _train(tmp_path / "other", small_run + [
        f"checkpoint.init_from={run}", "model.hidden_size=64"]) == 2
    assert "hidden_size: 32 (here 64)" in capsys.readouterr().err


def test_existing_output_is_kept(small_run, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    assert _train(run, small_run) == 0
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["convert", "--to", "hf", str(run), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    hf_dir = tmp_path / "hf"
    assert main(["convert", "--to", "hf", str(run), str(hf_dir)]) == 0
    for direction, source in (("--to", run), ("--from", hf_dir)):
        for target in (source, tmp_path):  # itself, a folder above it
            assert main(["convert", direction, "hf", str(source),
                         str(target), "--overwrite"]) == 2
            assert "would delete" in capsys.readouterr().err
    assert main(["grow", str(run), str(run), "--op", "depth",
                 "num_layers=3", "--overwrite"]) == 2
    assert "would delete" in capsys.readouterr().err
    assert coom.load_model(run) is not None


@pytest.mark.parametrize("make, words", [
    (lambda path: path, "is not a folder"),
    (lambda path: path.mkdir() or path, "holds no model"),
])
def test_load_model_explains_bad_paths(tmp_path, make, words):
    with pytest.raises(UserError, match=words):
        coom.load_model(make(tmp_path / "nothing"))


def test_synthetic_run_refuses_weights_of_a_tokenizer(small_run, tmp_path,
                                                      capsys):
    run = tmp_path / "run"
    assert _train(run, small_run) == 0
    assert _train(tmp_path / "other", small_run + [
        f"checkpoint.init_from={run}", "data.synthetic=true",
        "model.vocab_size=512"]) == 2
    assert "data.synthetic" in capsys.readouterr().err


def test_model_hugging_face_cannot_hold_leaves_the_output(tmp_path,
                                                          capsys):
    # Softmax routing exports as DeepseekV2, which has no expert bias.
    config = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2,
                         num_attention_heads=2, ffn_hidden_size=32,
                         kv_lora_rank=8, qk_nope_head_dim=8,
                         qk_rope_head_dim=4, v_head_dim=8,
                         n_routed_experts=4, moe_intermediate_size=8,
                         scoring_func="softmax", norm_topk_prob=False)
    model = Transformer(config)
    model.init_weights()
    state = model.state_dict()
    state["layers.1.mlp.router.bias"][0] = 0.5
    source, out = tmp_path / "source", tmp_path / "out"
    write_model_folder(Weights(config, state, None), tmp_path, source,
                       False, "a softmax-routed model")
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["convert", "--to", "hf", "--overwrite", str(source),
                 str(out)]) == 2
    assert "moe_router_enable_expert_bias" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
