"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Keys and values are not projected from the hidden state per head. The
hidden state is first compressed to one latent of ``kv_lora_rank``
channels (normalised by an RMSNorm), which is what a decoding cache needs
to keep, and ``wkv_b`` expands it to per-head keys (``qk_nope_head_dim``)
and values (``v_head_dim``). Position enters only through
``qk_rope_head_dim`` extra channels: a rotated query part per head and one
rotated key part shared by all heads, projected straight from the hidden
state. Queries are optionally low-rank too (``q_lora_rank``).

The softmax scale is 1/sqrt(qk head dim), times YaRN's mscale squared when
the context is stretched.

Tensor names end in their shape: b batch; s sequence; d model width; h
heads; r kv_lora_rank; n qk_nope_head_dim; p qk_rope_head_dim; v
v_head_dim.
"""
import math

import torch
from torch import nn
from torch.nn import functional

from coom.config import ModelConfig
from coom.layers.norm import RMSNorm
from coom.layers.rope import RotaryEmbedding, yarn_mscale


class MLA(nn.Module):
    """Multi-head Latent Attention over a causal sequence.

    Args:
        config: the model config (hidden_size, num_attention_heads, the
            q/kv ranks and head dimensions, the YaRN fields).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim, heads = config.hidden_size, config.num_attention_heads
        eps = config.layernorm_epsilon
        q_width = heads * config.qk_head_dim
        if config.q_lora_rank is None:
            self.wq = nn.Linear(dim, q_width, bias=False)
        else:
            self.wq_a = nn.Linear(dim, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, eps)
            self.wq_b = nn.Linear(config.q_lora_rank, q_width, bias=False)
        self.wkv_a = nn.Linear(
            dim, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(config.kv_lora_rank, eps)
        self.wkv_b = nn.Linear(
            config.kv_lora_rank,
            heads * (config.qk_nope_head_dim + config.v_head_dim),
            bias=False)
        self.wo = nn.Linear(heads * config.v_head_dim, dim, bias=False)
        self.softmax_scale = config.qk_head_dim ** -0.5
        if config.rope_type == "yarn":
            self.softmax_scale *= yarn_mscale(
                config.rotary_scaling_factor, config.mscale_all_dim) ** 2

    def init_weights(self, std: float) -> None:
        for module in self.children():
            if isinstance(module, RMSNorm):
                module.init_weights()
            elif module is not self.wo:
                nn.init.normal_(module.weight, std=std)
        depth = math.sqrt(2 * self.config.num_layers)
        nn.init.normal_(self.wo.weight, std=std / depth)

    def queries(self, x_bsd: torch.Tensor) -> torch.Tensor:
        """Per-head queries (b, s, h, n + p), rotary part not yet rotated.
        """
        if self.config.q_lora_rank is None:
            q = self.wq(x_bsd)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x_bsd)))
        return q.unflatten(-1, (self.config.num_attention_heads, -1))

    def latents(self, x_bsd: torch.Tensor, rope: RotaryEmbedding,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """What a cache keeps: the normalised latent (b, s, r) and the
        rotated shared key part (b, s, p)."""
        config = self.config
        kv_bsr, k_pe_bsp = self.wkv_a(x_bsd).split(
            [config.kv_lora_rank, config.qk_rope_head_dim], dim=-1)
        k_pe_bsp = rope(k_pe_bsp.unsqueeze(2), start).squeeze(2)
        return self.kv_norm(kv_bsr), k_pe_bsp

    def forward(self, x_bsd: torch.Tensor,
                rope: RotaryEmbedding) -> torch.Tensor:
        config = self.config
        heads = config.num_attention_heads
        q_nope, q_pe = self.queries(x_bsd).split(
            [config.qk_nope_head_dim, config.qk_rope_head_dim], dim=-1)
        kv_bsr, k_pe_bsp = self.latents(x_bsd, rope)
        k_nope, v_bshv = self.wkv_b(kv_bsr).unflatten(-1, (heads, -1)).split(
            [config.qk_nope_head_dim, config.v_head_dim], dim=-1)
        q_bshk = torch.cat([q_nope, rope(q_pe)], dim=-1)
        k_pe = k_pe_bsp.unsqueeze(2).expand(-1, -1, heads, -1)
        k_bshk = torch.cat([k_nope, k_pe], dim=-1)
        o_bhsv = functional.scaled_dot_product_attention(
            q_bshk.transpose(1, 2), k_bshk.transpose(1, 2),
            v_bshv.transpose(1, 2), is_causal=True,
            scale=self.softmax_scale)
        return self.wo(o_bhsv.transpose(1, 2).flatten(2))
