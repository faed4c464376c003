"""Decoding with the compressed cache against full forward passes."""
import pytest
import torch

from coom.config import ModelConfig
from coom.errors import UserError
from coom.layers.cache import DecodingCache
from coom.models import Transformer

BASE = dict(vocab_size=89, hidden_size=48, num_layers=3,
            num_attention_heads=3, ffn_hidden_size=80, kv_lora_rank=16,
            qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
            max_position_embeddings=64, moe_intermediate_size=24,
            n_routed_experts=6, num_experts_per_tok=2)

CONFIGS = {
    "full-rank queries": dict(),
    "low-rank queries, groups": dict(q_lora_rank=20, n_group=2,
                                     topk_group=1),
    "yarn, dense": dict(n_routed_experts=0, rope_type="yarn",
                        rotary_scaling_factor=4.0,
                        original_max_position_embeddings=16,
                        mscale=0.8, mscale_all_dim=0.7),
    "rotate_half pairs, yarn": dict(rope_interleave=False, rope_type="yarn",
                                    rotary_scaling_factor=4.0,
                                    original_max_position_embeddings=16),
}


def _model(config: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        model.init_weights()
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.copy_(1 + 0.2 * torch.randn_like(tensor))
            else:
                tensor.normal_(std=0.15)
    return model.eval()


@pytest.mark.parametrize("absorbed", [True, False],
                         ids=["absorbed", "expanded"])
@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_matches_the_full_forward(name, absorbed):
    config = ModelConfig(**{**BASE, **CONFIGS[name]})
    model = _model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 23),
                           generator=torch.Generator().manual_seed(1))
    cache = DecodingCache(config, config.num_layers, batch=2, capacity=30,
                          absorbed=absorbed)
    with torch.no_grad():
        full = model(tokens)
        # A prompt, single tokens, then a chunk, as generation and
        # speculative verification feed them.
        chunks = [model(tokens[:, :9], cache=cache)]
        chunks += [model(tokens[:, i:i + 1], cache=cache)
                   for i in range(9, 20)]
        chunks.append(model(tokens[:, 20:], cache=cache))
    assert cache.length == 23
    assert (torch.cat(chunks, dim=1) - full).abs().max() <= 1e-5


def test_truncated_cache_recomputes_the_same_logits():
    config = ModelConfig(**BASE)
    model = _model(config)
    tokens = torch.randint(0, config.vocab_size, (1, 12),
                           generator=torch.Generator().manual_seed(2))
    cache = DecodingCache(config, config.num_layers, batch=1, capacity=12)
    with torch.no_grad():
        model(tokens[:, :8], cache=cache)
        model(torch.zeros_like(tokens[:, 8:10]), cache=cache)
        cache.truncate(8)
        again = model(tokens[:, 8:], cache=cache)
        full = model(tokens)
    assert (again - full[:, 8:]).abs().max() <= 1e-5


def test_cache_holds_only_latent_and_rope_key():
    config = ModelConfig(**BASE)
    cache = DecodingCache(config, config.num_layers, batch=1, capacity=10)
    model = _model(config)
    with torch.no_grad():
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)
    per_token = config.num_layers * (config.kv_lora_rank
                                     + config.qk_rope_head_dim) * 4
    assert cache.nbytes == 7 * per_token


def test_cache_beyond_the_model_context_is_refused():
    config = ModelConfig(**BASE)
    with pytest.raises(UserError, match="max_position_embeddings"):
        DecodingCache(config, config.num_layers, batch=1, capacity=65)
