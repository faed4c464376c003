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

Decoding keeps a ``LatentCache``: per token only the normalised latent and
the rotated shared key part, ``kv_lora_rank + qk_rope_head_dim`` values.
Attention over it either expands the cached latents to per-head keys and
values again, or (``absorbed``) never does: the key up-projection W_UK is
folded into the query and the value up-projection W_UV applied after the
weighted sum, so scores and sums run in the latent space, as DeepSeek-V2
describes for inference.

Tensor names end in their shape: b batch; s sequence (new tokens); t
positions held in a cache; d model width; h heads; r kv_lora_rank; n
qk_nope_head_dim; p qk_rope_head_dim; v v_head_dim.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional
from torch.nn.attention import SDPBackend, sdpa_kernel

from coom.config import ModelConfig
from coom.layers.norm import RMSNorm
from coom.layers.recompute import direct
from coom.layers.rope import RotaryEmbedding, yarn_mscale

# On Hopper, cuDNN's fused attention takes MLA's unequal head dimensions
# (qk 192, v 128 in the small preset) and ran forward plus backward 8.7x
# faster than the memory-efficient kernel; flash attention refuses them.
PREFERRED_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                      SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Epsilon of the q and kv latent norms: DeepSeek's reference code and
# transformers fix it there, whatever the model's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def preferred_attention():
    """Context in which scaled_dot_product_attention tries cuDNN first,
    then the others in PyTorch's usual order. Wrap forward passes in it,
    outside any compiled region."""
    return sdpa_kernel(PREFERRED_BACKENDS, set_priority=True)


def attention(q_bhsk: torch.Tensor, k_bhtk: torch.Tensor,
              v_bhtv: torch.Tensor, mask_st: Optional[torch.Tensor],
              scale: float) -> torch.Tensor:
    """Scaled dot-product attention, causal when mask_st is None. On the
    meta device, where the planner counts what a GPU holds, it runs
    cuDNN's kernel as a GPU does (``PREFERRED_BACKENDS``), not the math
    kernel that meta would pick, which keeps every score."""
    if q_bhsk.is_meta and mask_st is None:
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q_bhsk, k_bhtk, v_bhtv, None, True, is_causal=True,
            scale=scale)[0]
    return functional.scaled_dot_product_attention(
        q_bhsk, k_bhtk, v_bhtv, attn_mask=mask_st,
        is_causal=mask_st is None, scale=scale)


@dataclass
class LatentCache:
    """One layer's decoding cache, seen by one forward.

    Attributes:
        latent_btr: normalised latents of every cached position.
        rope_key_btp: rotated shared key parts of every cached position.
        start: positions already held; the forward's tokens take
            positions start, start + 1, ...
        absorbed: attend in the latent space (W_UK, W_UV absorbed).
    """

    latent_btr: torch.Tensor
    rope_key_btp: torch.Tensor
    start: int
    absorbed: bool = True


class MLA(nn.Module):
    """Multi-head Latent Attention over a causal sequence.

    Args:
        config: the model config (hidden_size, num_attention_heads, the
            q/kv ranks and head dimensions, the YaRN fields).
        fused_kernels: let the latent norms call the fused op.
    """

    def __init__(self, config: ModelConfig, fused_kernels: bool = True):
        super().__init__()
        self.config = config
        dim, heads = config.hidden_size, config.num_attention_heads
        q_width = heads * config.qk_head_dim
        if config.q_lora_rank is None:
            self.wq = nn.Linear(dim, q_width, bias=False)
        else:
            self.wq_a = nn.Linear(dim, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS,
                                  fused_kernels)
            self.wq_b = nn.Linear(config.q_lora_rank, q_width, bias=False)
        self.wkv_a = nn.Linear(
            dim, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(config.kv_lora_rank, LATENT_NORM_EPS,
                               fused_kernels)
        self.wkv_b = nn.Linear(
            config.kv_lora_rank,
            heads * (config.qk_nope_head_dim + config.v_head_dim),
            bias=False)
        self.wo = nn.Linear(heads * config.v_head_dim, dim, bias=False)
        self.recompute = direct
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
        # Heads from the width: under tensor parallelism a process holds
        # only its share of them.
        return q.unflatten(-1, (-1, self.config.qk_head_dim))

    def latents(self, x_bsd: torch.Tensor, rope: RotaryEmbedding,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """What a cache keeps: the normalised latent (b, s, r) and the
        rotated shared key part (b, s, p)."""
        config = self.config
        kv_bsr, k_pe_bsp = self.wkv_a(x_bsd).split(
            [config.kv_lora_rank, config.qk_rope_head_dim], dim=-1)
        k_pe_bsp = rope(k_pe_bsp.unsqueeze(2), start).squeeze(2)
        return self.kv_norm(kv_bsr), k_pe_bsp

    def _attend_expanded(self, q_bshk: torch.Tensor, kv_btr: torch.Tensor,
                         k_pe_btp: torch.Tensor,
                         mask_st: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention with per-head keys and values expanded from latents;
        causal when mask_st is None."""
        config = self.config
        per_head = config.qk_nope_head_dim + config.v_head_dim
        k_nope, v_bthv = self.wkv_b(kv_btr).unflatten(
            -1, (-1, per_head)).split(
            [config.qk_nope_head_dim, config.v_head_dim], dim=-1)
        k_pe = k_pe_btp.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)
        k_bthk = torch.cat([k_nope, k_pe], dim=-1)
        o_bhsv = attention(q_bshk.transpose(1, 2), k_bthk.transpose(1, 2),
                           v_bthv.transpose(1, 2), mask_st,
                           self.softmax_scale)
        return o_bhsv.transpose(1, 2)

    def _attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor,
                         kv_btr: torch.Tensor, k_pe_btp: torch.Tensor,
                         mask_st: torch.Tensor) -> torch.Tensor:
        """Attention in the latent space: q_nope W_UK scores against the
        latents directly, and W_UV maps the weighted latents to values."""
        config = self.config
        w_hkr = self.wkv_b.weight.unflatten(
            0, (config.num_attention_heads, -1))
        w_uk_hnr, w_uv_hvr = w_hkr.split(
            [config.qk_nope_head_dim, config.v_head_dim], dim=1)
        q_latent_bshr = torch.einsum("bshn,hnr->bshr", q_nope, w_uk_hnr)
        scores_bhst = (
            torch.einsum("bshr,btr->bhst", q_latent_bshr, kv_btr)
            + torch.einsum("bshp,btp->bhst", q_pe, k_pe_btp))
        scores_bhst = (scores_bhst.float() * self.softmax_scale).masked_fill(
            ~mask_st, -math.inf)
        probs_bhst = scores_bhst.softmax(-1).type_as(kv_btr)
        o_latent_bshr = torch.einsum("bhst,btr->bshr", probs_bhst, kv_btr)
        return torch.einsum("bshr,hvr->bshv", o_latent_bshr, w_uv_hvr)

    def forward(self, x_bsd: torch.Tensor, rope: RotaryEmbedding,
                cache: Optional[LatentCache] = None) -> torch.Tensor:
        """Causal attention over x, or, given a cache, over the cached
        positions and x (whose latents the cache then holds too)."""
        return self.recompute(self.attend, x_bsd, rope, cache)

    def attend(self, x_bsd: torch.Tensor, rope: RotaryEmbedding,
               cache: Optional[LatentCache]) -> torch.Tensor:
        """What forward computes."""
        config = self.config
        start = 0 if cache is None else cache.start
        q_nope, q_pe = self.queries(x_bsd).split(
            [config.qk_nope_head_dim, config.qk_rope_head_dim], dim=-1)
        q_pe = rope(q_pe, start)
        kv_btr, k_pe_btp = self.latents(x_bsd, rope, start)
        mask_st = None
        if cache is not None:
            end = start + x_bsd.shape[1]
            cache.latent_btr[:, start:end] = kv_btr
            cache.rope_key_btp[:, start:end] = k_pe_btp
            kv_btr = cache.latent_btr[:, :end]
            k_pe_btp = cache.rope_key_btp[:, :end]
            positions = torch.arange(end, device=x_bsd.device)
            mask_st = positions <= positions[start:, None]
        if cache is not None and cache.absorbed:
            o_bshv = self._attend_absorbed(q_nope, q_pe, kv_btr, k_pe_btp,
                                           mask_st)
        else:
            o_bshv = self._attend_expanded(torch.cat([q_nope, q_pe], -1),
                                           kv_btr, k_pe_btp, mask_st)
        return self.wo(o_bshv.flatten(2))
