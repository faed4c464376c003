import pytest
import torch

from coom.config import ModelConfig
from coom.layers.moe import (
    AuxLossGradient,
    MoE,
    Router,
    balance_loss,
    grouped_matmul,
    grouped_mm,
)

CONFIG = ModelConfig(hidden_size=16, n_routed_experts=8,
                     num_experts_per_tok=2, moe_intermediate_size=8,
                     n_group=4, topk_group=2)


def _router(**overrides) -> Router:
    config = ModelConfig(**{**CONFIG.__dict__, **overrides})
    torch.manual_seed(0)
    router = Router(config)
    router.init_weights(std=0.5)
    return router


def test_bias_steers_selection_but_not_the_weights():
    router = _router(norm_topk_prob=False)
    x = torch.randn(50, 16)
    scores = router(x)[1]
    with torch.no_grad():
        router.bias[5] = 10.0
    _, _, weights, experts = router(x)
    assert (experts == 5).any(dim=-1).all()
    torch.testing.assert_close(weights, scores.gather(1, experts))


# Groups of two experts, ranked by both (DeepSeek-V3) or the best
# (DeepSeek-V2).
GROUP_RANKS = {"noaux_tc": lambda groups: groups.sum(-1),
               "group_limited_greedy": lambda groups: groups.amax(-1)}


@pytest.mark.parametrize("topk_method", GROUP_RANKS)
def test_group_limited_routing_matches_brute_force(topk_method):
    router = _router(topk_method=topk_method)
    x = torch.randn(200, 16)
    logits, scores, _, experts = router(x)
    torch.testing.assert_close(scores, logits.sigmoid())
    groups = scores.view(200, 4, 2)
    best_groups = GROUP_RANKS[topk_method](groups).topk(2, dim=-1).indices
    for token in range(200):
        allowed = torch.cat([torch.arange(2 * g, 2 * g + 2)
                             for g in best_groups[token].tolist()])
        expected = allowed[scores[token, allowed].topk(2).indices]
        assert set(experts[token].tolist()) == set(expected.tolist())


def test_moe_equals_per_token_reference():
    torch.manual_seed(1)
    moe = MoE(CONFIG)
    moe.init_weights(std=0.3)
    x = torch.randn(3, 7, 16)
    _, _, weights, experts = moe.router(x.flatten(0, 1))
    expected = moe.shared_experts(x.flatten(0, 1))
    experts_weights = moe.experts
    for token in range(21):
        for slot in range(2):
            e = experts[token, slot]
            h = x.flatten(0, 1)[token]
            out = experts_weights.w2[e] @ (
                torch.nn.functional.silu(experts_weights.w1[e] @ h)
                * (experts_weights.w3[e] @ h))
            expected[token] += weights[token, slot] * out
    torch.testing.assert_close(moe(x).flatten(0, 1), expected,
                               rtol=1e-5, atol=1e-5)


def test_balance_loss_is_one_when_perfectly_balanced():
    scores = torch.full((2, 4, 4), 0.5, dtype=torch.float64)
    experts = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]] * 2)
    for per_sequence in (True, False):
        loss = balance_loss(scores, experts, per_sequence)
        assert loss.item() == pytest.approx(1.0)


def test_sequence_wise_loss_sees_imbalance_inside_sequences():
    """Each sequence uses only two experts, the batch uses all four."""
    scores = torch.tensor([[[0.9, 0.9, 0.1, 0.1]] * 3,
                           [[0.1, 0.1, 0.9, 0.9]] * 3], dtype=torch.float64)
    experts = torch.tensor([[[0, 1]] * 3, [[2, 3]] * 3])
    batch = balance_loss(scores, experts, per_sequence=False)
    sequence = balance_loss(scores, experts, per_sequence=True)
    # batch: f = 1 for every expert, P = 0.25 each -> 1
    assert batch.item() == pytest.approx(1.0)
    # sequence: f = 2 on two experts, P = 0.45 on them -> 1.8
    assert sequence.item() == pytest.approx(1.8)


def test_training_forwards_count_the_load_and_evaluation_nothing():
    moe = MoE(CONFIG)
    moe.init_weights(std=0.3)
    moe(torch.randn(4, 9, 16))
    moe(torch.randn(1, 9, 16))
    assert moe.tokens_per_expert.sum() == 5 * 9 * 2
    assert moe.aux_loss_sum > 0
    moe.eval()
    moe(torch.randn(2, 5, 16))
    assert moe.tokens_per_expert.sum() == 5 * 9 * 2
    assert "router.bias" in moe.state_dict()
    assert "tokens_per_expert" not in moe.state_dict()


def test_auxiliary_loss_gradient_joins_the_backward():
    x = torch.randn(3, requires_grad=True)
    weight = torch.tensor(2.0, requires_grad=True)
    y = AuxLossGradient.apply(x, 0.5 * weight ** 2, 0.25)
    assert torch.equal(y, x)
    (3 * y).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 3.0))
    assert weight.grad.item() == 0.25 * 2.0


def test_the_layer_trains_its_auxiliary_losses_at_their_scale():
    """The router's gradient from a backward that ignores the output is
    that of aux_loss_scale x the weighted auxiliary losses."""
    config = ModelConfig(**{**CONFIG.__dict__, "moe_aux_loss_coeff": 0.01,
                            "moe_z_loss_coeff": 0.001})
    torch.manual_seed(0)
    moe = MoE(config)
    moe.init_weights(std=0.3)
    moe.aux_loss_scale = 0.25
    x = torch.randn(2, 9, 16)
    (0 * moe(x)).sum().backward()
    ours, moe.router.weight.grad = moe.router.weight.grad, None
    logits, scores, _, experts = moe.router(x.flatten(0, 1))
    aux = moe._aux_loss(logits, scores, experts, x.shape[:2])
    (0.25 * aux).backward()
    torch.testing.assert_close(ours, moe.router.weight.grad)
    assert ours.abs().sum() > 0
    torch.testing.assert_close(moe.aux_loss_sum, aux.detach())


@pytest.mark.parametrize("hidden, width", [(70, 20), (72, 20), (70, 24),
                                           (72, 24), (5, 3)])
def test_grouped_mm_takes_widths_it_cannot_stride(hidden, width):
    # torch._grouped_mm refuses bf16 rows of 70 or 20 values (strides not
    # multiples of 16 bytes); on CPU it runs, so the padding is tested
    # here against the loop over experts.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(13, hidden, generator=generator).bfloat16()
    weight = torch.randn(3, width, hidden, generator=generator).bfloat16()
    counts = torch.tensor([4, 0, 9])
    x.requires_grad_()
    weight.requires_grad_()
    grad = torch.randn(13, width, generator=generator).bfloat16()
    results = []
    for matmul in (grouped_mm, grouped_matmul):
        x.grad = weight.grad = None
        out = matmul(x, weight, counts)
        out.backward(grad)
        results.append((out, x.grad, weight.grad))
    for ours, loop in zip(*results, strict=True):
        torch.testing.assert_close(ours, loop, rtol=1e-2, atol=1e-2)
