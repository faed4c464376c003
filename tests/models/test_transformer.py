import torch
from torch.nn import functional

from coom.config import ModelConfig
from coom.models import Transformer
from tests.models.depth_logits import depth_logits


def _model(**overrides) -> Transformer:
    config = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2,
                         num_attention_heads=4, ffn_hidden_size=48,
                         max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def test_meta_build_then_init_gives_finite_weights():
    model = _model()
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
    assert torch.equal(model.layers["0"].mlp_norm.weight, torch.ones(32))
    logits = model(torch.randint(0, 97, (3, 17)))
    assert logits.shape == (3, 17, 97)


def test_init_is_seeded():
    first, second = _model(), _model()
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_output_projections_are_scaled_down():
    model = _model(init_method_std=0.5)
    block = model.layers["0"]
    assert block.attention.wq.weight.std() > 0.4
    assert block.attention.wo.weight.std() < 0.3
    assert block.mlp.w2.weight.std() < 0.3


def test_attention_is_causal():
    model = _model()
    tokens = torch.randint(0, 97, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 97
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_positions_matter():
    model = _model()
    tokens = torch.tensor([[5, 6, 7, 5, 6, 7]])
    with torch.no_grad():
        logits = model(tokens)
    assert not torch.allclose(logits[0, 0], logits[0, 3])


def test_tied_head_reads_the_embedding():
    model = _model(share_embeddings_and_output_weights=True)
    untied = _model()
    assert model.head.weight is None
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in untied.parameters()) - 97 * 32
    tokens = torch.randint(0, 97, (2, 9))
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.head.weight.copy_(model.embed.weight)
    torch.testing.assert_close(model(tokens), untied(tokens))
    model(tokens).sum().backward()
    assert model.embed.weight.grad is not None


def test_rope_matches_complex_rotation():
    """RoPE equals multiplying channel pairs by exp(i * pos * freq)."""
    model = _model()
    dim = model.config.qk_rope_head_dim
    x = torch.randn(1, 10, 2, dim)
    exponents = torch.arange(0, dim, 2).double() / dim
    freq = model.config.rotary_base ** -exponents
    angle = torch.arange(10).double()[:, None] * freq
    rotation = torch.polar(torch.ones_like(angle), angle)[None, :, None]
    expected = torch.view_as_real(
        torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))
        * rotation).flatten(-2)
    torch.testing.assert_close(model.rope(x).double(), expected,
                               rtol=1e-6, atol=1e-6)
    shifted = model.rope(x[:, 4:], start=4)
    torch.testing.assert_close(shifted, model.rope(x)[:, 4:])


def test_mtp_depths_see_only_the_past_and_the_token_ahead():
    model = _model(mtp_num_layers=2, n_routed_experts=4)
    tokens = torch.randint(0, 97, (2, 16))
    labels = torch.randint(0, 97, (2, 16))
    main, first, second = depth_logits(model, tokens, labels)
    with torch.no_grad():
        torch.testing.assert_close(main, model(tokens))
    assert first.shape == (2, 15, 97) and second.shape == (2, 14, 97)
    # depth 1 at position i reads tokens <= i and labels[i] (token i + 1);
    # changing labels from position 9 on leaves i < 9 alone
    changed = labels.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 97
    _, first_changed, second_changed = depth_logits(model, tokens, changed)
    assert torch.equal(first[:, :9], first_changed[:, :9])
    assert not torch.allclose(first[:, 9:], first_changed[:, 9:])
    # depth 2 at position i also reads labels[i + 1]
    assert torch.equal(second[:, :8], second_changed[:, :8])
    assert not torch.allclose(second[:, 8], second_changed[:, 8])


def test_losses_are_each_depths_mean_cross_entropy():
    model = _model(mtp_num_layers=2, n_routed_experts=4)
    tokens = torch.randint(0, 97, (2, 16))
    labels = torch.randint(0, 97, (2, 16))
    logits = depth_logits(model, tokens, labels)
    with torch.no_grad():
        losses = model(tokens, labels_bs=labels)
    assert losses.shape == (3,)
    for depth, (loss, logits_bsv) in enumerate(zip(losses, logits)):
        expected = functional.cross_entropy(logits_bsv.flatten(0, 1),
                                            labels[:, depth:].flatten())
        torch.testing.assert_close(loss, expected)
    # Evaluation scores the main model alone.
    with torch.no_grad():
        evaluated = model.eval()(tokens, labels_bs=labels)
    torch.testing.assert_close(evaluated, losses[:1])


def test_masked_tokens_count_for_nothing_and_the_step_divides():
    """A micro-batch's loss sums the tokens its mask keeps over the
    step's tokens, at each depth in proportion to its positions."""
    model = _model(mtp_num_layers=1, n_routed_experts=4)
    tokens = torch.randint(0, 97, (2, 16))
    labels = torch.randint(0, 97, (2, 16))
    mask = (torch.rand(2, 16) > 0.5).float()
    logits = depth_logits(model, tokens, labels)
    with torch.no_grad():
        losses = model(tokens, labels_bs=labels, loss_mask_bs=mask,
                       loss_tokens=4 * 32)
    for depth, (loss, logits_bsv) in enumerate(zip(losses, logits)):
        per_token = functional.cross_entropy(
            logits_bsv.flatten(0, 1), labels[:, depth:].flatten(),
            reduction="none")
        kept = (per_token * mask[:, depth:].flatten()).sum()
        share = (16 - depth) / 16
        torch.testing.assert_close(loss, kept / (4 * 32 * share))


def test_pipeline_parts_chained_compute_the_whole_model():
    model = _model(mtp_num_layers=1, n_routed_experts=4)
    tokens = torch.randint(0, 97, (2, 16))
    labels = torch.randint(0, 97, (2, 16))
    first = model.part([0], first=True, last=False)
    last = model.part([1], first=False, last=True)
    assert first.head is None and last.embed is None
    with torch.no_grad():
        whole = model(tokens, labels_bs=labels)
        handed = first(tokens, labels_bs=labels)
        assert len(handed) == 2  # the hidden state, depth 1's embeddings
        torch.testing.assert_close(last(*handed, labels_bs=labels), whole)
        torch.testing.assert_close(last(first(tokens)[0]), model(tokens))
    model.keep_only([last])
    assert list(model.layers) == ["1"] and model.embed is None
