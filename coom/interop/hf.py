"""Hugging Face ``DeepseekV3ForCausalLM`` and ``DeepseekV2ForCausalLM``
layouts: config and weight names.

COOM's parameter names follow DeepSeek-V3's reference code (``wq_a``,
``wkv_b``); the Hugging Face checkpoint layout names the same tensors after
their role (``q_a_proj``, ``kv_b_proj``) and stores routed experts one by
one (``mlp.experts.{e}.gate_proj.weight``), as DeepSeek-V3's released
checkpoint does. COOM pairs rotary channels as the checkpoint says (HF's
``rope_interleave``), so every tensor maps across unchanged.

DeepSeek-V2's layout is V3's without the routers' expert bias and MTP
layers: softmax routing exports as V2, whose groups rank by their best
expert (``topk_method``). Each config.json field is read as transformers
computes it, or refused by name where COOM does not compute it.
"""
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from coom.config import ModelConfig
from coom.errors import UserError

_ATTENTION = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm",
              "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
              "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj",
              "wo": "o_proj"}
_SWIGLU = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_TOP = {"embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
_BLOCK = {"attention_norm.weight": "input_layernorm.weight",
          "mlp_norm.weight": "post_attention_layernorm.weight",
          "mlp.router.weight": "mlp.gate.weight",
          "mlp.router.bias": "mlp.gate.e_score_correction_bias"}
for _coom, _hf in _ATTENTION.items():
    _BLOCK[f"attention.{_coom}.weight"] = f"self_attn.{_hf}.weight"
for _coom, _hf in _SWIGLU.items():
    _BLOCK[f"mlp.{_coom}.weight"] = f"mlp.{_hf}.weight"
    _BLOCK[f"mlp.shared_experts.{_coom}.weight"] = \
        f"mlp.shared_experts.{_hf}.weight"
_EXPERTS = re.compile(r"mlp\.experts\.(w[123])$")
_HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(\w+)\.weight$")


def _is_v2(config: ModelConfig) -> bool:
    """Whether config routes as DeepSeek-V2 does, with softmax scores:
    Hugging Face's DeepseekV2 holds it, DeepseekV3 routes by sigmoid."""
    return config.n_routed_experts > 0 and config.scoring_func == "softmax"


def _refuse_unexportable(config: ModelConfig) -> None:
    """Refuse, by field, what the Hugging Face model cannot hold."""
    grouped = config.n_group > 1
    if not _is_v2(config):
        if grouped and config.topk_method != "noaux_tc":
            raise UserError("model.topk_method: Hugging Face's DeepseekV3 "
                            "ranks expert groups by noaux_tc only")
        return
    checks = [
        (config.norm_topk_prob, "norm_topk_prob",
         "does not normalise the top-k weights"),
        (grouped and config.topk_method == "noaux_tc", "topk_method",
         "ranks expert groups by group_limited_greedy only"),
        (config.mtp_num_layers > 0, "mtp_num_layers", "has no MTP layers"),
        (not config.rope_interleave, "rope_interleave",
         "pairs rotary channels (2i, 2i+1) only")]
    for wrong, name, reason in checks:
        if wrong:
            raise UserError(f"model.{name}: Hugging Face's DeepseekV2, "
                            f"which softmax routing exports as, {reason}")


def _rope_scaling(config: ModelConfig) -> dict | None:
    if config.rope_type != "yarn":
        return None
    return {"type": "yarn", "rope_type": "yarn",
            "factor": config.rotary_scaling_factor,
            "original_max_position_embeddings":
                config.original_max_position_embeddings,
            "beta_fast": config.beta_fast, "beta_slow": config.beta_slow,
            "mscale": config.mscale, "mscale_all_dim": config.mscale_all_dim}


def _routing_config(config: ModelConfig) -> dict:
    """config.json's architecture and routing fields."""
    if _is_v2(config):
        grouped = config.n_group > 1
        return {"architectures": ["DeepseekV2ForCausalLM"],
                "model_type": "deepseek_v2", "scoring_func": "softmax",
                "topk_method": ("group_limited_greedy" if grouped
                                else "greedy")}
    return {"architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3", "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "rope_interleave": config.rope_interleave,
            "num_nextn_predict_layers": config.mtp_num_layers}


# Model fields that steer training only, which no Hugging Face field
# holds: config.json keeps them under TRAINING_KEY, so that a model
# converted there and back trains on as before.
TRAINING_FIELDS = ("moe_router_bias_update_rate", "moe_seq_aux_loss_coeff",
                   "moe_aux_loss_coeff", "moe_z_loss_coeff")
TRAINING_KEY = "coom_training"


def hf_config(config: ModelConfig) -> dict:
    """config.json of the equivalent Hugging Face model: a
    DeepseekV3ForCausalLM, or a DeepseekV2ForCausalLM where experts are
    routed by softmax scores."""
    _refuse_unexportable(config)
    moe = config.n_routed_experts > 0
    return {
        **_routing_config(config),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "n_shared_experts": config.n_shared_experts,
        "n_routed_experts": config.n_routed_experts if moe else 1,
        "num_experts_per_tok": config.num_experts_per_tok if moe else 1,
        "first_k_dense_replace": (config.first_k_dense_replace if moe
                                  else config.num_layers),
        "routed_scaling_factor": config.routed_scaling_factor,
        "n_group": config.n_group,
        "topk_group": config.topk_group,
        "norm_topk_prob": config.norm_topk_prob,
        "q_lora_rank": config.q_lora_rank,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rotary_base,
        "rope_scaling": _rope_scaling(config),
        "rms_norm_eps": config.layernorm_epsilon,
        "initializer_range": config.init_method_std,
        "tie_word_embeddings": config.share_embeddings_and_output_weights,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        TRAINING_KEY: {name: getattr(config, name)
                       for name in TRAINING_FIELDS},
    }


_MTP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
        "eh_proj.weight": "eh_proj.weight",
        "norm.weight": "shared_head.norm.weight"}
# Copies of the shared embedding and head that DeepSeek-V3's layout keeps
# in every MTP layer; COOM shares the model's own.
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")


def _block_to_hf(rest: str, tensor: torch.Tensor, prefix: str,
                 out: dict) -> None:
    stacked = _EXPERTS.match(rest)
    if stacked:
        role = _SWIGLU[stacked.group(1)]
        for expert, weight in enumerate(tensor.unbind(0)):
            out[f"{prefix}mlp.experts.{expert}.{role}.weight"] = weight
    elif rest in _BLOCK:
        out[prefix + _BLOCK[rest]] = tensor
    else:
        raise KeyError(f"no Hugging Face name for {prefix}{rest}")


def _empty_shared_experts(out: dict, config: ModelConfig) -> None:
    """Shared experts of width 0 in every MoE layer of out: transformers
    builds them so where n_shared_experts is 0, and looks for their
    weights."""
    dim = config.hidden_size
    for name in [name for name in out if name.endswith(".mlp.gate.weight")]:
        prefix = name.removesuffix("gate.weight") + "shared_experts."
        empty = out[name].new_empty(0, dim)
        out[prefix + "gate_proj.weight"] = empty
        out[prefix + "up_proj.weight"] = empty
        out[prefix + "down_proj.weight"] = empty.T


def _without_router_bias(state: dict) -> dict:
    """state without the routers' expert biases, which DeepseekV2 has no
    place for; refused unless they are all zero."""
    biases = [name for name in state if name.endswith("mlp.router.bias")]
    if any(state[name].any() for name in biases):
        raise UserError("model.moe_router_enable_expert_bias: the routers' "
                        "expert biases are not zero, and Hugging Face's "
                        "DeepseekV2, which softmax routing exports as, has "
                        "none")
    return {name: tensor for name, tensor in state.items()
            if name not in biases}


def to_hf(state: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    """COOM model state dict to Hugging Face names, experts unstacked and
    MTP depths as the layers after the last block."""
    out = {}
    head = state.get("head.weight", state["embed.weight"])
    if _is_v2(config):
        state = _without_router_bias(state)
    for name, tensor in state.items():
        if name in _TOP:
            out[_TOP[name]] = tensor
            continue
        group, index, rest = name.split(".", 2)
        if group == "layers":
            _block_to_hf(rest, tensor, f"model.layers.{index}.", out)
            continue
        prefix = f"model.layers.{config.num_layers + int(index)}."
        if rest.startswith("block."):
            _block_to_hf(rest.removeprefix("block."), tensor, prefix, out)
        else:
            out[prefix + _MTP[rest]] = tensor
    for depth in range(config.mtp_num_layers):
        prefix = f"model.layers.{config.num_layers + depth}."
        out[prefix + "embed_tokens.weight"] = state["embed.weight"]
        out[prefix + "shared_head.head.weight"] = head
    if not config.n_shared_experts:
        _empty_shared_experts(out, config)
    return out


def from_hf(hf_state: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict to COOM names, experts stacked."""
    top = {hf: coom for coom, hf in _TOP.items()}
    block = {hf: coom for coom, hf in _BLOCK.items()}
    mtp = {hf: coom for coom, hf in _MTP.items()}
    roles = {hf: coom for coom, hf in _SWIGLU.items()}
    out, experts = {}, {}
    for name, tensor in hf_state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        match = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        index = int(match.group(1)) if match else -1
        if not 0 <= index < config.num_layers + config.mtp_num_layers:
            raise UserError(f"unexpected tensor {name} in the Hugging Face "
                            "checkpoint")
        rest = match.group(2)
        prefix = f"layers.{index}."
        if index >= config.num_layers:
            prefix = f"mtp.{index - config.num_layers}.block."
            if rest in _MTP_SHARED:
                continue
            if rest in mtp:
                out[prefix.removesuffix("block.") + mtp[rest]] = tensor
                continue
        expert = _HF_EXPERT.match(rest)
        if (rest.startswith("mlp.shared_experts.") and not tensor.numel()
                and not config.n_shared_experts):
            continue  # transformers' shared experts of width 0
        if expert:
            key = (prefix, roles[expert.group(2)])
            experts.setdefault(key, {})[int(expert.group(1))] = tensor
        elif rest in block:
            out[prefix + block[rest]] = tensor
        else:
            raise UserError(f"unexpected tensor {name} in the Hugging Face "
                            "checkpoint")
    for (prefix, role), by_expert in experts.items():
        out[f"{prefix}mlp.experts.{role}"] = torch.stack(
            [by_expert[e] for e in range(len(by_expert))])
    # DeepseekV2 has no expert bias: its routing is COOM's with a zero
    # one, as transformers starts a missing one.
    for name in [name for name in out if name.endswith("router.weight")]:
        out.setdefault(name.removesuffix("weight") + "bias",
                       out[name].new_zeros(out[name].shape[0]))
    return out


# Keys of rope_scaling (rope_parameters) that COOM computes as
# transformers does.
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor",
              "original_max_position_embeddings", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim", "truncate"}


def _rope_fields(hf: dict) -> dict:
    """ModelConfig's rotary fields of a config.json's rope_scaling (or
    transformers 5's rope_parameters), missing values read as transformers
    reads them."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(key) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise UserError(f"config.json {key}.rope_type: COOM computes "
                        f"default and yarn rotary embeddings, not '{kind}'")
    unknown = sorted(set(rope) - _ROPE_KEYS)
    if rope.get("truncate") is False:
        unknown.append("truncate")
    if unknown:
        raise UserError(f"config.json {key}.{unknown[0]}: COOM does not "
                        "compute it; remove it or convert the model "
                        "another way")
    fields = {"rotary_base": float(rope.get("rope_theta",
                                            hf.get("rope_theta", 10000.0)))}
    if kind == "yarn":
        # transformers reads a missing or zero mscale or mscale_all_dim
        # as 0, and 0 turns its part of the attention factor off.
        fields.update(
            rope_type="yarn", rotary_scaling_factor=float(rope["factor"]),
            original_max_position_embeddings=rope[
                "original_max_position_embeddings"],
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 0),
            mscale_all_dim=float(rope.get("mscale_all_dim") or 0))
    return fields


# config.json fields that COOM computes for one value only, the one
# DeepSeek's checkpoints hold.
_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def _refuse_fixed(hf: dict) -> None:
    """Refuse, by name, a field that asks for what COOM does not compute."""
    for name, value in _FIXED.items():
        if hf.get(name, value) != value:
            raise UserError(f"config.json {name}: COOM computes only "
                            f"{json.dumps(value)}, not {json.dumps(hf[name])}")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads") not in (None, heads):
        raise UserError(f"config.json num_key_value_heads: MLA has one key "
                        f"and value per head, so it must equal "
                        f"num_attention_heads {heads}")


def _routing_fields(hf: dict) -> dict:
    """ModelConfig's routing fields: DeepseekV3's sigmoid scores and
    expert bias, or DeepseekV2's softmax scores, with groups as its
    topk_method says and top-k weights never normalised (transformers
    ignores its norm_topk_prob, so a true one is refused)."""
    if hf["model_type"] == "deepseek_v3":
        return {"scoring_func": "sigmoid", "topk_method": "noaux_tc",
                "n_group": hf["n_group"], "topk_group": hf["topk_group"],
                "norm_topk_prob": hf["norm_topk_prob"]}
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise UserError(f"config.json topk_method: DeepseekV2 routes by "
                        f"greedy or group_limited_greedy, not '{method}'")
    if hf.get("norm_topk_prob"):
        raise UserError("config.json norm_topk_prob: transformers' "
                        "DeepseekV2 never normalises the top-k weights; "
                        "set it false")
    grouped = method == "group_limited_greedy"
    return {"scoring_func": "softmax", "topk_method": "group_limited_greedy",
            "n_group": hf["n_group"] if grouped else 1,
            "topk_group": hf["topk_group"] if grouped else 1,
            "norm_topk_prob": False, "moe_router_enable_expert_bias": False}


def _model_fields(hf: dict) -> dict:
    """ModelConfig's fields of a config.json, but for rope and routing."""
    dense = min(hf["first_k_dense_replace"], hf["num_hidden_layers"])
    moe = dense < hf["num_hidden_layers"]
    # DeepseekV2 pairs rotary channels (2i, 2i+1) whatever the key says.
    interleave = (hf.get("rope_interleave", True)
                  if hf["model_type"] == "deepseek_v3" else True)
    return {
        "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": hf["num_attention_heads"],
        "ffn_hidden_size": hf["intermediate_size"],
        "q_lora_rank": hf.get("q_lora_rank"),
        "kv_lora_rank": hf["kv_lora_rank"],
        "qk_nope_head_dim": hf["qk_nope_head_dim"],
        "qk_rope_head_dim": hf["qk_rope_head_dim"],
        "v_head_dim": hf["v_head_dim"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "first_k_dense_replace": dense,
        "n_routed_experts": hf["n_routed_experts"] if moe else 0,
        # transformers leaves it None in dense DeepseekV2 configs.
        "num_experts_per_tok": hf["num_experts_per_tok"] or 1,
        "n_shared_experts": hf["n_shared_experts"],
        "moe_intermediate_size": hf["moe_intermediate_size"],
        "routed_scaling_factor": float(hf["routed_scaling_factor"]),
        "layernorm_epsilon": hf["rms_norm_eps"],
        "init_method_std": hf.get("initializer_range", 0.02),
        "share_embeddings_and_output_weights":
            hf.get("tie_word_embeddings", False),
        "rope_interleave": interleave,
        "mtp_num_layers": hf.get("num_nextn_predict_layers", 0),
    }


def model_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig of a DeepseekV3 or DeepseekV2 config.json
    (transformers 4 or 5)."""
    if hf.get("model_type") not in ("deepseek_v3", "deepseek_v2"):
        raise UserError(f"config.json is a '{hf.get('model_type')}' model; "
                        "COOM reads deepseek_v3 and deepseek_v2 checkpoints")
    try:
        _refuse_fixed(hf)
        fields = {**_model_fields(hf), **_routing_fields(hf),
                  **_rope_fields(hf)}
    except KeyError as error:
        raise UserError(f"config.json has no {error.args[0]}") from None
    return ModelConfig(**fields, **_training_fields(hf))


def _training_fields(hf: dict) -> dict:
    """The TRAINING_FIELDS a config.json written by COOM keeps."""
    kept = hf.get(TRAINING_KEY, {})
    unknown = set(kept) - set(TRAINING_FIELDS) if isinstance(
        kept, dict) else {"(not a mapping)"}
    if unknown:
        raise UserError(f"config.json's {TRAINING_KEY} holds "
                        f"{', '.join(sorted(unknown))}; it may hold "
                        f"{', '.join(TRAINING_FIELDS)}")
    return kept


def check_exportable(state: dict, config: ModelConfig) -> None:
    """Refuse, by field, a model that no Hugging Face class can hold."""
    hf_config(config)
    if _is_v2(config):
        _without_router_bias(state)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_hf(state: dict, config: ModelConfig, folder: Path) -> None:
    """Write model.safetensors and config.json of a COOM model state."""
    check_exportable(state, config)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory: MTP layers hold
    # copies of the embedding and head, so every tensor is cloned.
    tensors = {name: tensor.detach().clone().contiguous()
               for name, tensor in to_hf(state, config).items()}
    path = folder / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file readable by its owner only; give it the
    # permissions of the config.json beside it (the umask's).
    path.chmod(0o666 & ~_umask())
    (folder / "config.json").write_text(
        json.dumps(hf_config(config), indent=2))


def _read_json(path: Path) -> dict:
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path} holds no JSON object of config fields")
    return hf


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} cannot be read as safetensors ({error}); "
                        "it may be cut short or of another format") from None


def load_hf(folder: Path) -> tuple[ModelConfig, dict]:
    """ModelConfig and COOM state dict of a Hugging Face checkpoint."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} holds no config.json; give a Hugging "
                        "Face model folder")
    config = model_config_from_hf(_read_json(config_path))
    hf_state = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors files")
    for path in files:
        hf_state.update(_read_safetensors(path))
    state = from_hf(hf_state, config)
    if config.share_embeddings_and_output_weights:
        state.pop("head.weight", None)
    # transformers writes no MTP layers: keep the depths that are there.
    depths = {int(name.split(".")[1]) for name in state
              if name.startswith("mtp.")}
    config = replace(config, mtp_num_layers=len(depths))
    return config, state
