"""Causal multi-head self-attention with rotary positions.

Shape legend: B batch, S sequence, D model width, H heads, K head dimension.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(self, x_BSD: torch.Tensor,
                rope: RotaryEmbedding) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q_BSHK = rope(self.wq(x_BSD).unflatten(-1, heads))
        k_BSHK = rope(self.wk(x_BSD).unflatten(-1, heads))
        v_BSHK = self.wv(x_BSD).unflatten(-1, heads)
        o_BHSK = F.scaled_dot_product_attention(
            q_BSHK.transpose(1, 2), k_BSHK.transpose(1, 2),
            v_BSHK.transpose(1, 2), is_causal=True)
        return self.wo(o_BHSK.transpose(1, 2).flatten(2))
