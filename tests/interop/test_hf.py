"""COOM against transformers' DeepseekV3ForCausalLM and
DeepseekV2ForCausalLM, both directions."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

from coom.cli import main
from coom.config import ModelConfig, load_config
from coom.errors import UserError
from coom.interop.hf import (
    hf_config,
    load_hf,
    model_config_from_hf,
    save_hf,
)
from coom.models import Transformer

BASE = dict(vocab_size=96, hidden_size=48, num_layers=3,
            num_attention_heads=3, ffn_hidden_size=80, kv_lora_rank=16,
            qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
            max_position_embeddings=64, moe_intermediate_size=24,
            num_experts_per_tok=3, n_shared_experts=1)
# DeepSeek-V2's routing: softmax scores, no expert bias, unnormalised.
V2 = dict(scoring_func="softmax", norm_topk_prob=False,
          topk_method="group_limited_greedy",
          moe_router_enable_expert_bias=False)

CONFIGS = {
    "dense, full-rank queries": dict(n_routed_experts=0),
    "moe, low-rank queries, 2 groups pick 1": dict(
        q_lora_rank=20, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, routed_scaling_factor=2.5),
    "moe everywhere, 4 groups pick 2, yarn": dict(
        first_k_dense_replace=0, n_routed_experts=8, n_group=4,
        topk_group=2, n_shared_experts=2, rope_type="yarn",
        rotary_scaling_factor=4.0, original_max_position_embeddings=16,
        mscale=0.8, mscale_all_dim=0.7),
    "moe, unnormalised top-k, tied head, 2 MTP depths": dict(
        q_lora_rank=24, n_routed_experts=6, norm_topk_prob=False,
        share_embeddings_and_output_weights=True, mtp_num_layers=2),
    "moe with one MTP depth": dict(n_routed_experts=4, mtp_num_layers=1),
    "moe without shared experts, one MTP depth": dict(
        n_routed_experts=4, n_shared_experts=0, mtp_num_layers=1),
    "moe, rotate_half pairs, yarn with mscale_all_dim 0, eps 1e-5": dict(
        n_routed_experts=4, q_lora_rank=20, rope_interleave=False,
        rope_type="yarn", rotary_scaling_factor=4.0,
        original_max_position_embeddings=16, mscale=0.8, mscale_all_dim=0.0,
        layernorm_epsilon=1e-5),
    "v2, no groups (V2-Lite's greedy), 2 shared": dict(
        **V2, n_routed_experts=8, n_shared_experts=2),
    "v2, 4 groups pick 2 by their best, low-rank queries, yarn": dict(
        **V2, q_lora_rank=20, n_routed_experts=8, n_group=4, topk_group=2,
        routed_scaling_factor=16.0, rope_type="yarn",
        rotary_scaling_factor=4.0, original_max_position_embeddings=16,
        mscale=0.707, mscale_all_dim=0.707),
    "v2, groups of one expert, moe everywhere": dict(
        **V2, first_k_dense_replace=0, n_routed_experts=6, n_group=6,
        topk_group=3, num_experts_per_tok=2),
}


def _coom_model(config: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        model.init_weights()
        for name, tensor in model.state_dict().items():
            if tensor.dtype.is_floating_point:
                if name.endswith("norm.weight"):
                    tensor.copy_(1 + 0.2 * torch.randn_like(tensor))
                elif name.endswith("router.bias"):
                    if config.moe_router_enable_expert_bias:
                        tensor.copy_(0.1 * torch.randn_like(tensor))
                else:
                    tensor.normal_(std=0.15)
    return model.eval()


def _tokens(config: ModelConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 37),
                         generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", CONFIGS)
def test_coom_to_hf_gives_the_same_logits(name, tmp_path):
    config = ModelConfig(**{**BASE, **CONFIGS[name]})
    model = _coom_model(config)
    save_hf(model.state_dict(), config, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(hf).__name__ == hf_config(config)["architectures"][0]
    tokens = _tokens(config)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4


HF_CLASSES = {"deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
              "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM)}


def _random_hf(hf_config_json: dict):
    """transformers' model of a config.json, random weights of std 0.15
    and norm scales around 1."""
    torch.manual_seed(2)
    config_class, model_class = HF_CLASSES[hf_config_json["model_type"]]
    hf = model_class(config_class(**hf_config_json))
    with torch.no_grad():
        for key, tensor in hf.state_dict().items():
            if "layernorm" in key or key.endswith("norm.weight"):
                tensor.copy_(1 + 0.2 * torch.randn_like(tensor))
            elif tensor.dtype.is_floating_point:
                tensor.normal_(std=0.15)
    hf.config._attn_implementation = "eager"
    return hf.eval()


def _import_matches(hf, folder) -> ModelConfig:
    """Save hf to folder, import it, and check COOM's logits against it;
    returns the imported config."""
    hf.save_pretrained(folder)
    loaded_config, state = load_hf(folder)
    model = Transformer(loaded_config)
    model.load_state_dict(state, strict=True)
    model.rope.init_weights()
    tokens = _tokens(loaded_config)
    with torch.no_grad():
        ours, theirs = model.eval()(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4
    return loaded_config


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_to_coom_gives_the_same_logits(name, tmp_path):
    config = ModelConfig(**{**BASE, **CONFIGS[name]})
    loaded_config = _import_matches(_random_hf(hf_config(config)), tmp_path)
    # transformers' model has no MTP layers, so none come back.
    assert hf_config(loaded_config) == hf_config(
        replace(config, mtp_num_layers=0))


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_keeps_every_tensor(name, tmp_path):
    config = ModelConfig(**{**BASE, **CONFIGS[name]})
    model = _coom_model(config)
    save_hf(model.state_dict(), config, tmp_path)
    loaded_config, state = load_hf(tmp_path)
    assert loaded_config.mtp_num_layers == config.mtp_num_layers
    ours = model.state_dict()
    assert set(state) == set(ours)
    for key, tensor in ours.items():
        assert torch.equal(state[key], tensor), key
    names = safe_open(str(tmp_path / "model.safetensors"), "pt").keys()
    for depth in range(config.mtp_num_layers):
        layer = f"model.layers.{config.num_layers + depth}."
        assert layer + "eh_proj.weight" in names
        assert layer + "shared_head.head.weight" in names


MOE = {**BASE, "num_layers": 2, "n_routed_experts": 4,
       "num_experts_per_tok": 2}
V3_JSON = hf_config(ModelConfig(**MOE))
V2_JSON = hf_config(ModelConfig(**MOE, **V2))
YARN = {"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 16}

# config.json files as checkpoints may hold them, changed from what COOM
# writes: each must load as transformers computes it and write back as the
# same model.
FIELDS = {
    "yarn without mscale or mscale_all_dim": {**V3_JSON,
                                              "rope_scaling": YARN},
    "yarn with mscale_all_dim 0": {
        **V3_JSON,
        "rope_scaling": {**YARN, "mscale": 0.8, "mscale_all_dim": 0}},
    "yarn with mscale only": {**V3_JSON,
                              "rope_scaling": {**YARN, "mscale": 0.8}},
    "yarn with mscale_all_dim only": {
        **V3_JSON, "rope_scaling": {**YARN, "mscale_all_dim": 0.7}},
    "rope_interleave false": {**V3_JSON, "rope_interleave": False},
    "rope_interleave false, yarn, low-rank queries": {
        **V3_JSON, "rope_interleave": False, "q_lora_rank": 20,
        "rope_scaling": {**YARN, "mscale": 0.8, "mscale_all_dim": 0.7}},
    "rms_norm_eps 0.05, low-rank queries": {
        **V3_JSON, "rms_norm_eps": 0.05, "q_lora_rank": 20},
    "rms_norm_eps 1e-5": {**V3_JSON, "rms_norm_eps": 1e-5},
    "n_shared_experts 0": {**V3_JSON, "n_shared_experts": 0},
    "all of them, 2 groups pick 1": {
        **V3_JSON, "rope_scaling": {**YARN, "mscale_all_dim": 1.0},
        "rope_interleave": False, "rms_norm_eps": 1e-5,
        "n_shared_experts": 0, "n_group": 2, "topk_group": 1},
    # DeepseekV2 ignores groups under greedy, and rope_interleave always.
    "v2 greedy, with groups": {**V2_JSON, "n_group": 2, "topk_group": 1},
    "v2 without topk_method": {key: value for key, value in V2_JSON.items()
                               if key != "topk_method"},
    "v2 with rope_interleave false, 2 groups pick 1 by their best": {
        **V2_JSON, "rope_interleave": False, "n_group": 2, "topk_group": 1,
        "topk_method": "group_limited_greedy"},
    "v2 without shared experts, yarn without mscale": {
        **V2_JSON, "n_shared_experts": 0, "rope_scaling": YARN},
}


@pytest.mark.parametrize("name", FIELDS)
def test_config_fields_read_as_transformers_reads_them(name, tmp_path):
    hf = _random_hf(FIELDS[name])
    config = _import_matches(hf, tmp_path / "in")
    _, state = load_hf(tmp_path / "in")
    save_hf(state, config, tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager",
        dtype=torch.float32).eval()
    assert type(again) is type(hf)
    theirs = again.state_dict()
    for key, tensor in hf.state_dict().items():
        assert torch.equal(theirs[key], tensor), key
    tokens = _tokens(config)
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, hf(tokens).logits)


# Fields whose value COOM does not compute: the import names the field.
REFUSED = {
    "hidden_act": {**V3_JSON, "hidden_act": "gelu"},
    "attention_bias": {**V3_JSON, "attention_bias": True},
    "mlp_bias": {**V2_JSON, "mlp_bias": True},
    "num_key_value_heads": {**V3_JSON, "num_key_value_heads": 1},
    "rope_type": {**V3_JSON,
                  "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "attention_factor": {
        **V3_JSON, "rope_scaling": {**YARN, "attention_factor": 1.2}},
    "truncate": {**V3_JSON, "rope_scaling": {**YARN, "truncate": False}},
    "factor": {**V3_JSON, "rope_scaling": {
        "rope_type": "yarn", "original_max_position_embeddings": 16}},
    "topk_method": {**V2_JSON, "topk_method": "noaux_tc"},
    "norm_topk_prob": {**V2_JSON, "norm_topk_prob": True},
    "kv_lora_rank": {key: value for key, value in V3_JSON.items()
                     if key != "kv_lora_rank"},
}


@pytest.mark.parametrize("field", REFUSED)
def test_config_fields_not_computed_are_refused(field, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REFUSED[field]))
    with pytest.raises(UserError, match=field) as error:
        load_hf(tmp_path)
    assert "\n" not in str(error.value)


# COOM models that Hugging Face's classes cannot hold: the export names
# the field.
UNEXPORTABLE = {
    "topk_method": {**MOE, "n_group": 2, "topk_group": 1,
                    "topk_method": "group_limited_greedy"},
    "norm_topk_prob": {**MOE, **V2, "norm_topk_prob": True},
    "mtp_num_layers": {**MOE, **V2, "mtp_num_layers": 1},
    "rope_interleave": {**MOE, **V2, "rope_interleave": False},
}


@pytest.mark.parametrize("field", UNEXPORTABLE)
def test_models_hugging_face_cannot_hold_are_refused(field, tmp_path):
    config = ModelConfig(**UNEXPORTABLE[field])
    with pytest.raises(UserError, match=f"model.{field}"):
        save_hf(_coom_model(config).state_dict(), config, tmp_path)


def test_v2_export_refuses_an_expert_bias(tmp_path):
    config = ModelConfig(**MOE, **V2)
    state = _coom_model(config).state_dict()
    state["layers.1.mlp.router.bias"][2] = 0.1
    with pytest.raises(UserError, match="moe_router_enable_expert_bias"):
        save_hf(state, config, tmp_path)
    assert not any(tmp_path.iterdir())


# Fields of the released config.json files (deepseek-ai on the Hugging
# Face hub).
PUBLISHED = {
    "deepseek-v3-671b": {
        "architectures": ["DeepseekV3ForCausalLM"], "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "n_routed_experts": 256, "num_experts_per_tok": 8,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True},
    "deepseek-v2": {
        "architectures": ["DeepseekV2ForCausalLM"], "scoring_func": "softmax",
        "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3,
        "n_routed_experts": 160, "num_experts_per_tok": 6,
        "routed_scaling_factor": 16.0, "norm_topk_prob": False},
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "scoring_func": "softmax",
        "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "n_routed_experts": 64, "num_experts_per_tok": 6, "q_lora_rank": None,
        "routed_scaling_factor": 1.0, "norm_topk_prob": False},
}


@pytest.mark.parametrize("recipe", PUBLISHED)
def test_published_architectures_export_their_config_json(recipe):
    model = load_config(recipe).model
    config_json = hf_config(model)
    assert PUBLISHED[recipe].items() <= config_json.items()
    assert hf_config(model_config_from_hf(config_json)) == config_json


def test_model_safetensors_gets_the_permissions_of_config_json(tmp_path):
    config = ModelConfig(**BASE)
    save_hf(_coom_model(config).state_dict(), config, tmp_path)
    mode = (tmp_path / "config.json").stat().st_mode
    assert (tmp_path / "model.safetensors").stat().st_mode == mode


@pytest.mark.parametrize("text, words", [
    ("{\"vocab_size\": 96,", "is not valid JSON"),
    ("[1, 2]", "holds no JSON object"),
])
def test_corrupt_config_json_is_one_line(text, words, tmp_path):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match=words) as error:
        load_hf(tmp_path)
    assert "\n" not in str(error.value)


def test_cut_safetensors_is_one_line(tmp_path):
    config = ModelConfig(**BASE)
    save_hf(_coom_model(config).state_dict(), config, tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="model.safetensors cannot be read"):
        load_hf(tmp_path)


@pytest.mark.parametrize("field, value, words", [
    ("moe_intermediate_size", 32, "does not describe its weights: "
     "layers.1.mlp.experts.w1 has shape (4, 24, 48) in the weights, "
     "(4, 32, 48) in the model"),
    ("num_hidden_layers", 4, "does not describe its weights: "
     "layers.3.attention.kv_norm.weight is missing from the weights"),
    ("num_hidden_layers", 2, "unexpected tensor "
     "model.layers.2.input_layernorm.weight"),
])
def test_config_json_that_does_not_fit_the_weights_is_refused(
        field, value, words, tmp_path, capsys):
    config = ModelConfig(**BASE, n_routed_experts=4)
    source = tmp_path / "hf"
    save_hf(_coom_model(config).state_dict(), config, source)
    hf = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**hf, field: value}))
    assert main(["convert", "--from", "hf", str(source),
                 str(tmp_path / "out")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_import_without_coom_training_settings_says_what_it_defaults(
        tmp_path, capsys):
    config = ModelConfig(**BASE, n_routed_experts=4,
                         moe_router_bias_update_rate=0.01)
    source = tmp_path / "hf"
    save_hf(_coom_model(config).state_dict(), config, source)
    hf = json.loads((source / "config.json").read_text())
    assert hf.pop("coom_training")["moe_router_bias_update_rate"] == 0.01
    (source / "config.json").write_text(json.dumps(hf))
    assert main(["convert", "--from", "hf", str(source),
                 str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "holds no COOM training settings" in out
    assert "model.moe_router_bias_update_rate=0.001" in out
