"""What a model config costs: parameters, training FLOPs, KV cache bytes;
and which parameters weight decay applies to.

The counts are read off the model itself, built on the ``meta`` device (no
memory is touched, so DeepSeek-V3 671B takes a second), rather than from a
formula that could drift from the code.

- *total* parameters: every parameter of the main model; the MTP depths
  are counted apart, as DeepSeek reports 671B without its 14B MTP module.
- *active* parameters: those one token passes through: of the embedding
  table one row, of a routed expert's weights ``num_experts_per_tok /
  n_routed_experts`` of their size, everything else whole. DeepSeek's
  published "37B activated" for V3 is this count (36.6B) rounded; counting
  the whole embedding table as well would give 37.6B.
- *matmul* parameters: the active ones that enter a matrix product (all
  but the embedding row and the norm gains). Training costs 6 FLOPs per
  such parameter and token (forward 2, backward 4), plus causal attention:
  per layer and token 3 * s * h * (qk + v) FLOPs for the scores and the
  weighted values, half of the 6 * s * h * (qk + v) of a full square, at
  sequence length s.
"""
from dataclasses import dataclass

import torch

from coom.config import ModelConfig
from coom.layers.moe import GroupedExperts
from coom.layers.norm import RMSNorm
from coom.models.transformer import Transformer


@dataclass(frozen=True)
class ModelInfo:
    """Sizes of one model config; see the module docstring."""

    total_params: int
    active_params: int
    matmul_params: int
    mtp_params: int
    training_flops_per_token: float
    mla_cache_values_per_token: int
    mha_cache_values_per_token: int


def _counts(modules, config: ModelConfig) -> tuple[float, float, float]:
    """(total, active, matmul) parameters of modules."""
    total = active = matmul = 0.0
    share = config.num_experts_per_tok / max(config.n_routed_experts, 1)
    for module in modules:
        for child in module.modules():
            size = sum(p.numel() for p in child.parameters(recurse=False))
            total += size
            if isinstance(child, torch.nn.Embedding):
                active += config.hidden_size
            elif isinstance(child, RMSNorm):
                active += size
            else:
                used = size * share if isinstance(child, GroupedExperts) \
                    else size
                active += used
                matmul += used
    return total, active, matmul


def state_shapes(config: ModelConfig) -> dict[str, tuple]:
    """The model's tensor shapes by name, as its state dict (and so a
    checkpoint) holds them whole."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(tensor.shape)
            for name, tensor in model.state_dict().items()}


def attention_flops_per_token(config: ModelConfig, seq_length: int,
                              blocks: int) -> float:
    """Training FLOPs of causal attention scores and values per token."""
    per_head = config.qk_head_dim + config.v_head_dim
    return 3.0 * seq_length * config.num_attention_heads * per_head * blocks


def model_info(config: ModelConfig, seq_length: int) -> ModelInfo:
    """Sizes of the model config describes, trained at seq_length."""
    with torch.device("meta"):
        model = Transformer(config)
    main = [model.embed, model.layers, model.norm]
    total, active, matmul = _counts(main, config)
    head = config.vocab_size * config.hidden_size
    if model.head.weight is not None:
        total += head
        active += head
    mtp_total, _, mtp_matmul = _counts(model.mtp, config)
    # Each MTP depth runs the shared head once more.
    flop_params = matmul + head + config.mtp_num_layers * head + mtp_matmul
    blocks = config.num_layers + config.mtp_num_layers
    flops = 6.0 * flop_params + attention_flops_per_token(
        config, seq_length, blocks)
    heads = config.num_attention_heads
    return ModelInfo(
        total_params=round(total),
        active_params=round(active),
        matmul_params=round(matmul + head),
        mtp_params=round(mtp_total),
        training_flops_per_token=flops,
        mla_cache_values_per_token=config.num_layers * (
            config.kv_lora_rank + config.qk_rope_head_dim),
        mha_cache_values_per_token=config.num_layers * heads * (
            config.qk_head_dim + config.v_head_dim))


def decays(parameter: torch.Tensor) -> bool:
    """Whether weight decay applies to parameter: to matrices and
    embeddings, not to norm scales. The optimizer's groups and the
    optimizer state a growth carries both follow it."""
    return parameter.dim() >= 2


def _human(count: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return f"{count:.0f}"


def describe(config: ModelConfig, seq_length: int,
             bytes_per_value: int = 2) -> str:
    """The text ``coom model info`` prints."""
    info = model_info(config, seq_length)
    mla = info.mla_cache_values_per_token * bytes_per_value
    mha = info.mha_cache_values_per_token * bytes_per_value
    moe = (f"{config.n_routed_experts} routed experts, top "
           f"{config.num_experts_per_tok}, {config.n_shared_experts} shared"
           if config.n_routed_experts else "dense")
    lines = [
        f"layers            {config.num_layers} (hidden "
        f"{config.hidden_size}, {config.num_attention_heads} heads; {moe})",
        f"total parameters  {_human(info.total_params)} "
        f"({info.total_params:,})",
        f"active per token  {_human(info.active_params)} "
        f"({info.active_params:,}), {_human(info.matmul_params)} of "
        "them in matmuls",
    ]
    if config.mtp_num_layers:
        lines.append(f"MTP depths        {config.mtp_num_layers}, "
                     f"{_human(info.mtp_params)} parameters more")
    lines += [
        f"training FLOPs    {info.training_flops_per_token / 1e9:.3f} "
        f"GFLOP per token at sequence length {seq_length}",
        f"KV cache          {mla:,} bytes per token in bf16 "
        f"({config.kv_lora_rank} latent + {config.qk_rope_head_dim} rope "
        f"values x {config.num_layers} layers); multi-head attention of "
        f"the same shape: {mha:,} bytes ({mha / mla:.1f}x)",
    ]
    return "\n".join(lines)
