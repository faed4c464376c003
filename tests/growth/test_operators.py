"""Every growth operator keeps the model's function: float32 logits of the
main model and of the MTP depths it had, and the loss, before and after,
on several small configs whose weights are perturbed away from their
init (norm scales, expert biases), so that no rule holds by accident."""
import pytest
import torch
from torch.nn import functional

from coom.config import ModelConfig
from coom.errors import UserError
from coom.growth.operators import grow
from coom.models import Transformer
from tests.models.depth_logits import depth_logits

BASE = dict(vocab_size=97, hidden_size=32, num_layers=3,
            num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, ffn_hidden_size=64,
            moe_intermediate_size=16, max_position_embeddings=64)

CONFIGS = {
    # Sigmoid routing with normalised weights, a dense first block,
    # low-rank queries and one MTP depth (DeepSeek-V3's shape).
    "v3": ModelConfig(**BASE, q_lora_rank=24, first_k_dense_replace=1,
                      n_routed_experts=4, num_experts_per_tok=2,
                      mtp_num_layers=1),
    # Softmax routing, unnormalised weights with a scale, two shared
    # experts, no dense block (DeepSeek-V2's routing).
    "softmax": ModelConfig(**BASE | {"num_layers": 2},
                           scoring_func="softmax", norm_topk_prob=False,
                           routed_scaling_factor=2.5, n_shared_experts=2,
                           first_k_dense_replace=0, n_routed_experts=4,
                           num_experts_per_tok=2),
    # Group-limited routing.
    "groups": ModelConfig(**BASE, first_k_dense_replace=1,
                          n_routed_experts=8, n_group=2, topk_group=1,
                          num_experts_per_tok=2),
    # Dense only, with MTP.
    "dense": ModelConfig(**BASE, mtp_num_layers=1),
    # MoE blocks shaped as upcycled ones: 4 segments of 16 units, one
    # shared, replicas of 3 routed segments.
    "upcycled": ModelConfig(**BASE, first_k_dense_replace=2,
                            n_routed_experts=6, num_experts_per_tok=3,
                            routed_scaling_factor=3.0, mtp_num_layers=1),
}

PRESERVING = [
    ("v3", "depth", {"num_layers": 5}),
    ("softmax", "depth", {"num_layers": 5}),
    ("dense", "depth", {"num_layers": 4}),
    ("groups", "depth", {"num_layers": 4}),
    ("v3", "mtp", {"depths": 2}),
    ("softmax", "mtp", {"depths": 1}),
    ("v3", "width", {"hidden_size": 48}),
    ("v3", "width", {"num_attention_heads": 3}),
    ("v3", "width", {"q_lora_rank": 32, "kv_lora_rank": 20}),
    ("v3", "width", {"ffn_hidden_size": 80, "moe_intermediate_size": 24}),
    ("v3", "width", {"hidden_size": 40, "num_attention_heads": 4,
                     "q_lora_rank": 30, "kv_lora_rank": 32,
                     "ffn_hidden_size": 72, "moe_intermediate_size": 20}),
    ("softmax", "width", {"hidden_size": 64, "moe_intermediate_size": 32}),
    ("dense", "width", {"hidden_size": 33, "ffn_hidden_size": 65}),
    ("v3", "add_experts", {"n_routed_experts": 7}),
    ("groups", "add_experts", {"n_routed_experts": 12}),
    ("v3", "split_experts", {"segments": 2}),
    ("softmax", "split_experts", {"segments": 4}),
    ("dense", "upcycle", {"first_k_dense_replace": 1,
                          "n_routed_experts": 12, "num_experts_per_tok": 6,
                          "n_shared_experts": 1,
                          "moe_intermediate_size": 16}),
    ("dense", "upcycle", {"first_k_dense_replace": 0,
                          "n_routed_experts": 8, "num_experts_per_tok": 4,
                          "n_shared_experts": 0,
                          "moe_intermediate_size": 32}),
    ("upcycled", "upcycle", {"first_k_dense_replace": 0}),
]


def _trained_like(config: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose norm scales and expert biases are not at their
    init."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("norm.weight"):
                tensor.add_(0.2 * torch.randn_like(tensor))
            elif name.endswith("router.bias"):
                tensor.copy_(0.05 * torch.randn_like(tensor))
    return model.eval()


def _outputs(model: Transformer, tokens, labels):
    """Logits of the main model and each MTP depth, and the main loss."""
    logits = depth_logits(model, tokens, labels)
    loss = functional.cross_entropy(logits[0].flatten(0, 1),
                                    labels.flatten())
    return logits, loss


def _grown_model(model: Transformer, op: str, arguments: dict):
    state = {name: tensor.clone() for name, tensor
             in model.state_dict().items()}
    grown = grow(model.config, state, None, op, arguments, seed=1)
    with torch.device("meta"):
        bigger = Transformer(grown.config)
    bigger.to_empty(device="cpu")
    bigger.init_weights()
    bigger.load_state_dict(grown.weights)
    return bigger.eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name, op, arguments", PRESERVING,
                         ids=[f"{op}-{name}-{'-'.join(map(str, a.values()))}"
                              for name, op, a in PRESERVING])
def test_growth_keeps_the_function(name, op, arguments):
    model = _trained_like(CONFIGS[name])
    tokens = torch.randint(0, 97, (2, 24))
    labels = torch.randint(0, 97, (2, 24))
    before, loss_before = _outputs(model, tokens, labels)
    grown = _grown_model(model, op, arguments)
    after, loss_after = _outputs(grown, tokens, labels)
    assert sum(p.numel() for p in grown.parameters()) \
        > sum(p.numel() for p in model.parameters())
    for old, new in zip(before, after):
        assert _relative(new, old) < 1e-5
    assert abs(loss_after - loss_before).item() < 1e-6


def test_stacking_copies_the_moe_blocks_in_order():
    model = _trained_like(CONFIGS["v3"])
    grown = _grown_model(model, "depth", {"num_layers": 7,
                                          "method": "stack"})
    sources = [0, 1, 2, 1, 2, 1, 2]
    for index, source in enumerate(sources):
        new, old = grown.layers[str(index)], model.layers[str(source)]
        for (key, a), b in zip(new.state_dict().items(),
                               old.state_dict().values()):
            assert torch.equal(a, b), (index, key)


def test_new_experts_are_never_chosen_until_their_bias_rises():
    model = _trained_like(CONFIGS["groups"])
    grown = _grown_model(model, "add_experts", {"n_routed_experts": 12})
    moe = grown.layers["1"].mlp
    tokens = torch.randn(500, 32)
    *_, experts_tk = moe.router(tokens)
    # Each group of 4 became 6; the new ones are the last two of each.
    new = torch.tensor([4, 5, 10, 11])
    assert not torch.isin(experts_tk, new).any()
    moe.router.bias[new] += 2.0
    *_, experts_tk = moe.router(tokens)
    assert torch.isin(experts_tk, new).any()


@pytest.mark.parametrize("name, op, arguments, words", [
    ("v3", "depth", {"num_layers": 3}, "must exceed"),
    ("v3", "depth", {"num_layers": 4, "method": "copy"}, "identity or stack"),
    ("v3", "width", {"hidden_size": 16}, "smaller than"),
    ("v3", "width", {"kv_lora_rank": 17.5}, "must be int"),
    ("v3", "width", {"heads": 4}, "takes"),
    ("softmax", "width", {"q_lora_rank": 32}, "unset"),
    ("groups", "add_experts", {"n_routed_experts": 9}, "do not split"),
    ("v3", "split_experts", {"segments": 3}, "divide"),
    ("v3", "upcycle", {"first_k_dense_replace": 0}, "multiple"),
    ("dense", "upcycle", {"first_k_dense_replace": 1}, "give"),
    ("dense", "split_experts", {"segments": 2}, "upcycle"),
    ("v3", "teleport", {}, "unknown growth operator"),
])
def test_bad_growth_is_refused_with_the_reason(name, op, arguments, words):
    model = _trained_like(CONFIGS[name])
    with pytest.raises(UserError, match=words):
        grow(model.config, model.state_dict(), None, op, arguments, seed=0)


def test_refusals_that_depend_on_the_routing():
    state = _trained_like(CONFIGS["softmax"]).state_dict()
    with pytest.raises(UserError, match="softmax"):
        grow(CONFIGS["softmax"], state, None, "add_experts",
             {"n_routed_experts": 6}, seed=0)
    groups = _trained_like(CONFIGS["groups"]).state_dict()
    with pytest.raises(UserError, match="n_group"):
        grow(CONFIGS["groups"], groups, None, "split_experts",
             {"segments": 2}, seed=0)
    tied = ModelConfig(**BASE, share_embeddings_and_output_weights=True)
    state = _trained_like(tied).state_dict()
    with pytest.raises(UserError, match="tied"):
        grow(tied, state, None, "width", {"hidden_size": 64}, seed=0)
