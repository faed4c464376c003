"""Adam's moments cross a growth by the rule of coom.growth.tensors, and
the grown state loads into the grown model's optimizer."""
import torch
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)

from coom.config import ModelConfig, OptimizerConfig
from coom.growth.operators import grow
from coom.models import Transformer
from coom.train.optimizer import build_optimizer

CONFIG = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2,
                     num_attention_heads=2, kv_lora_rank=16,
                     qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                     ffn_hidden_size=64, n_routed_experts=4,
                     moe_intermediate_size=16, max_position_embeddings=64)


def _model(config: ModelConfig) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def _trained():
    """A model and its optimizer after two steps, as full state dicts."""
    torch.manual_seed(0)
    model = _model(CONFIG)
    optimizer = build_optimizer(model, OptimizerConfig())
    for _ in range(2):
        tokens = torch.randint(0, 97, (2, 16))
        model(tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return get_state_dict(model, optimizer)


def _loaded(grown):
    """The grown model and optimizer, loaded from the grown state."""
    model = _model(grown.config)
    optimizer = build_optimizer(model, OptimizerConfig())
    set_state_dict(model, optimizer, model_state_dict=grown.weights,
                   optim_state_dict=grown.optimizer)
    return model, optimizer


def test_identity_blocks_start_with_zero_moments_and_others_move():
    weights, optimizer = _trained()
    grown = grow(CONFIG, weights, optimizer, "depth", {"num_layers": 3},
                 seed=1)
    _, state = get_state_dict(*_loaded(grown))
    # One MoE block (index 1) is followed by the new one (index 2).
    for name, moments in state["state"].items():
        assert moments["step"].item() == 2.0
        if name.startswith("layers.2."):
            assert not moments["exp_avg"].any()
            assert not moments["exp_avg_sq"].any()
        else:
            assert torch.equal(moments["exp_avg"],
                               optimizer["state"][name]["exp_avg"]), name


def test_scaled_entries_scale_their_moments_and_new_ones_are_zero():
    weights, optimizer = _trained()
    grown = grow(CONFIG, weights, optimizer, "width", {"hidden_size": 50},
                 seed=1)
    _loaded(grown)
    scale = (50 / 32) ** 0.5
    old, new = optimizer["state"], grown.optimizer["state"]
    embed, norm = "embed.weight", "layers.0.attention_norm.weight"
    torch.testing.assert_close(new[embed]["exp_avg"][:, :32],
                               old[embed]["exp_avg"] * scale)
    torch.testing.assert_close(new[embed]["exp_avg_sq"][:, :32],
                               old[embed]["exp_avg_sq"] * scale ** 2)
    torch.testing.assert_close(new[norm]["exp_avg"][:32],
                               old[norm]["exp_avg"] / scale)
    for moments in (new[embed], new[norm]):
        assert not moments["exp_avg"][..., 32:].any()
        assert not moments["exp_avg_sq"][..., 32:].any()
    # Norm scales decay in neither optimizer.
    groups = grown.optimizer["param_groups"]
    assert norm in groups[1]["params"] and embed in groups[0]["params"]
    assert groups[1]["weight_decay"] == 0.0


def test_a_step_after_growth_trains_every_weight():
    weights, optimizer = _trained()
    grown = grow(CONFIG, weights, optimizer, "depth", {"num_layers": 3},
                 seed=1)
    model, loaded = _loaded(grown)
    before = {name: p.detach().clone()
              for name, p in model.named_parameters()}
    model(torch.randint(0, 97, (2, 16))).square().mean().backward()
    loaded.step()
    new_block = "layers.2.attention.wo.weight"
    assert model.get_parameter(new_block).abs().sum() > 0
    moved = [name for name, p in model.named_parameters()
             if not torch.equal(p, before[name])]
    assert new_block in moved and "embed.weight" in moved
