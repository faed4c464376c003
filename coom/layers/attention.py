"""Causal multi-head self-attention with rotary positions.

Tensor names end in their shape: b batch; s sequence; d model width; h
heads; k head dimension.
"""
import math

import torch
from torch import nn
from torch.nn import functional

from coom.layers.rope import RotaryEmbedding


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``.

    Args:
        dim: model width D.
        num_heads: heads H; the head dimension is D / H.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def init_weights(self, std: float, num_layers: int) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, std=std)
        nn.init.normal_(self.wo.weight, std=std / math.sqrt(2 * num_layers))

    def forward(self, x_bsd: torch.Tensor,
                rope: RotaryEmbedding) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q_bshk = rope(self.wq(x_bsd).unflatten(-1, heads))
        k_bshk = rope(self.wk(x_bsd).unflatten(-1, heads))
        v_bshk = self.wv(x_bsd).unflatten(-1, heads)
        o_bhsk = functional.scaled_dot_product_attention(
            q_bshk.transpose(1, 2), k_bshk.transpose(1, 2),
            v_bshk.transpose(1, 2), is_causal=True)
        return self.wo(o_bhsk.transpose(1, 2).flatten(2))
