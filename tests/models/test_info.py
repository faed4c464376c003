from dataclasses import replace

import pytest

from coom.cli import main
from coom.config import ModelConfig, load_config
from coom.models import Transformer
from coom.models.info import model_info


def _matmul_params_by_hand(c: ModelConfig) -> int:
    """Active matmul parameters of a config without q compression, from
    the architecture's description rather than from the module tree."""
    d, h = c.hidden_size, c.num_attention_heads
    attention = (d * h * (c.qk_nope_head_dim + c.qk_rope_head_dim)
                 + d * (c.kv_lora_rank + c.qk_rope_head_dim)
                 + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
                 + h * c.v_head_dim * d)
    dense = 3 * d * c.ffn_hidden_size
    experts = c.num_experts_per_tok + c.n_shared_experts
    moe = experts * 3 * d * c.moe_intermediate_size + c.n_routed_experts * d
    dense_layers = c.first_k_dense_replace
    return (c.num_layers * attention + dense_layers * dense
            + (c.num_layers - dense_layers) * moe + c.vocab_size * d)


def test_small_preset_has_the_documented_size():
    config = load_config("small")
    info = model_info(config.model, config.data.seq_length)
    assert info.matmul_params == _matmul_params_by_hand(config.model)
    assert round(info.total_params / 1e7) == 193
    assert round(info.matmul_params / 1e6) == 378
    attention = 3 * 4096 * 12 * (192 + 128) * 12
    assert info.training_flops_per_token == \
        6 * info.matmul_params + attention
    assert round(info.training_flops_per_token / 1e7) == 284
    assert info.mla_cache_values_per_token == 12 * (512 + 64)
    assert info.mha_cache_values_per_token == 12 * 12 * (192 + 128)


def test_counts_agree_with_the_built_model():
    config = ModelConfig(vocab_size=101, hidden_size=32, num_layers=3,
                         num_attention_heads=2, ffn_hidden_size=40,
                         q_lora_rank=24, n_routed_experts=6,
                         num_experts_per_tok=2, mtp_num_layers=2)
    info = model_info(config, seq_length=64)
    model = Transformer(config)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    assert info.mtp_params == mtp
    assert info.total_params == \
        sum(p.numel() for p in model.parameters()) - mtp
    main_moe = [moe for index, moe in model.moe_layers().items()
                if index < config.num_layers]
    experts = sum(moe.experts.w1.numel() * 3 for moe in main_moe)
    unused_embedding_rows = (101 - 1) * 32
    assert info.active_params == round(
        info.total_params - experts * 4 / 6 - unused_embedding_rows)


def test_deepseek_v3_matches_the_published_sizes():
    config = load_config("deepseek-v3-671b")
    info = model_info(config.model, config.data.seq_length)
    # DeepSeek-V3: 671B total, 37B activated, MTP module 11.5B of its own.
    assert info.total_params == pytest.approx(671e9, rel=0.01)
    assert round(info.active_params / 1e9) == 37
    assert info.mtp_params == pytest.approx(11.5e9, rel=0.01)
    assert info.mla_cache_values_per_token == 61 * 576


def test_deepseek_v2_matches_the_published_sizes():
    config = load_config("deepseek-v2")
    info = model_info(config.model, config.data.seq_length)
    # DeepSeek-V2: 236B total, 21B activated.
    assert info.total_params == pytest.approx(236e9, rel=0.01)
    assert info.active_params == pytest.approx(21e9, rel=0.01)
    assert info.mla_cache_values_per_token == 60 * 576


def test_deepseek_v2_lite_matches_the_published_sizes():
    config = load_config("deepseek-v2-lite")
    info = model_info(config.model, config.data.seq_length)
    assert info.matmul_params == _matmul_params_by_hand(config.model)
    # DeepSeek-V2-Lite: 15.7B total, 2.4B activated. COOM counts 2.45B
    # active, as it counts V2's and V3's (the output head and routers in,
    # the embedding out), which match theirs within 1%; DeepSeek gives
    # no breakdown that would explain the 2% left here.
    assert info.total_params == pytest.approx(15.7e9, rel=0.01)
    assert info.active_params == pytest.approx(2.4e9, rel=0.025)
    assert info.mla_cache_values_per_token == 27 * 576


def test_small_mtp_is_small_plus_one_depth():
    small, mtp = load_config("small"), load_config("small-mtp")
    assert mtp.model.mtp_num_layers == 1
    assert mtp.model == replace(small.model, mtp_num_layers=1)
    assert mtp.train == small.train


def test_recipe_base_cycle_is_refused(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("base: b.yaml\n")
    second.write_text("base: a.yaml\n")
    with pytest.raises(Exception, match="includes itself"):
        load_config(str(first))


def test_model_info_command(capsys):
    assert main(["model", "info", "deepseek-v3-671b"]) == 0
    out = capsys.readouterr().out
    assert "671B" in out and "36.6B" in out
    assert "70,272 bytes per token" in out
