import torch

from coom.config import ModelConfig
from coom.layers.moe import MoE, Router

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
    scores, _, _ = router(x)
    with torch.no_grad():
        router.bias[5] = 10.0
    _, weights, experts = router(x)
    assert (experts == 5).any(dim=-1).all()
    torch.testing.assert_close(weights, scores.gather(1, experts))


def test_group_limited_routing_matches_brute_force():
    router = _router()
    x = torch.randn(200, 16)
    scores, _, experts = router(x)
    groups = scores.view(200, 4, 2)
    best_groups = groups.sum(-1).topk(2, dim=-1).indices
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
    _, weights, experts = moe.router(x.flatten(0, 1))
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
