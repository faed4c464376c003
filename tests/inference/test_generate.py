"""Sampling and MTP self-speculative decoding."""
import pytest
import torch

from coom.cli import main
from coom.config import ModelConfig
from coom.errors import UserError
from coom.inference.generate import choose, generate, generate_speculative
from coom.models import Transformer

CONFIG = ModelConfig(vocab_size=61, hidden_size=40, num_layers=2,
                     num_attention_heads=2, ffn_hidden_size=64,
                     kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=8,
                     max_position_embeddings=64, n_routed_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16,
                     mtp_num_layers=1)
PROMPT = [3, 14, 15, 9, 26, 5]


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CONFIG)
    with torch.no_grad():
        model.init_weights()
        for name, tensor in model.named_parameters():
            if not name.endswith("norm.weight"):
                tensor.normal_(std=0.2)
    return model.eval()


def _greedy_by_full_forwards(model: Transformer, count: int) -> list[int]:
    tokens = list(PROMPT)
    with torch.no_grad():
        for _ in range(count):
            tokens.append(model(torch.tensor([tokens]))[0, -1].argmax()
                          .item())
    return tokens[len(PROMPT):]


@pytest.mark.parametrize("absorbed", [True, False])
def test_greedy_decoding_matches_full_forwards(absorbed):
    model = _model()
    out = generate(model, PROMPT, 20, absorbed=absorbed)
    assert out.tokens == _greedy_by_full_forwards(model, 20)
    per_token = CONFIG.num_layers * (16 + 8) * 4
    assert out.cache_bytes == (len(PROMPT) + 19) * per_token


def test_generation_stops_at_the_stop_token():
    model = _model()
    expected = _greedy_by_full_forwards(model, 20)
    stop = expected[7]
    out = generate(model, PROMPT, 20, stop=stop)
    assert out.tokens == expected[:expected.index(stop) + 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_decoding_gives_the_greedy_output(seed):
    model = _model(seed)
    plain = generate(model, PROMPT, 25)
    fast = generate_speculative(model, PROMPT, 25)
    assert fast.tokens == plain.tokens
    assert 0 <= fast.accepted <= fast.drafted < 25


def test_every_right_draft_is_accepted():
    """With both final norms zero every logit ties, so the main model and
    the draft both always pick token 0: every draft must be accepted."""
    model = _model()
    with torch.no_grad():
        model.norm.weight.zero_()
        model.mtp[0].norm.weight.zero_()
    fast = generate_speculative(model, PROMPT, 21)
    assert fast.tokens == [0] * 21
    assert fast.accepted == fast.drafted == 10


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(4000, -1)
    generator = torch.Generator().manual_seed(0)
    # Probabilities 0.64, 0.24, 0.09, 0.03: the 0.9 nucleus is 3 tokens.
    picked = choose(logits, 1.0, 0.9, generator)
    counts = torch.bincount(picked, minlength=4)
    assert counts[3] == 0 and counts[2] > 0
    assert counts[0] / 4000 == pytest.approx(0.64 / 0.97, abs=0.03)
    assert choose(logits, 1.0, 0.5, generator).eq(0).all()
    assert choose(logits, 0.0, 1.0, None).eq(0).all()


def test_sampling_is_seeded():
    model = _model()
    first = generate(model, PROMPT, 15, temperature=1.0, top_p=0.95, seed=4)
    again = generate(model, PROMPT, 15, temperature=1.0, top_p=0.95, seed=4)
    other = generate(model, PROMPT, 15, temperature=1.0, top_p=0.95, seed=5)
    assert first.tokens == again.tokens != other.tokens


def test_bad_requests_are_explained():
    model = _model()
    with pytest.raises(UserError, match="empty"):
        generate(model, [], 5)
    with pytest.raises(UserError, match=r"\[0, 61\)"):
        generate(model, [61], 5)
    with pytest.raises(UserError, match="max_position_embeddings"):
        generate(model, PROMPT, 60)
    with pytest.raises(UserError, match=r"top-p must lie in \(0, 1\]"):
        generate(model, PROMPT, 5, temperature=1.0, top_p=0)
    with pytest.raises(UserError, match="temperature must be 0"):
        generate(model, PROMPT, 5, temperature=-1.0)


def test_generate_command(small_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--set", *small_run]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def main(",
                 "--max-new-tokens", "12", "--temperature", "0",
                 "--speculative"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def main(")
    assert "MTP drafts accepted" in err and "bytes per token" in err
    assert main(["generate", str(run), "--prompt", "x",
                 "--speculative"]) == 2
    assert "--temperature 0" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "x", "--top-p",
                 "0"]) == 2
    assert "top-p must lie in" in capsys.readouterr().err
