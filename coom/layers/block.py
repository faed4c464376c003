"""The transformer block: MLA attention, then a dense or MoE feed-forward.

Tensor names end in their shape: b batch; s sequence; d model width.
"""
from typing import Optional

import torch
from torch import nn

from coom.config import ModelConfig
from coom.layers.mla import MLA, LatentCache
from coom.layers.mlp import SwiGLU
from coom.layers.moe import MoE
from coom.layers.norm import RMSNorm
from coom.layers.rope import RotaryEmbedding


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp.

    Args:
        config: the model config.
        index: position of the block, which decides dense or MoE.
        fused_kernels: let the layers call the fused ops
            (``coom.kernels``) rather than their references.
    """

    def __init__(self, config: ModelConfig, index: int,
                 fused_kernels: bool = True):
        super().__init__()
        dim, eps = config.hidden_size, config.layernorm_epsilon
        self.attention_norm = RMSNorm(dim, eps, fused_kernels)
        self.attention = MLA(config, fused_kernels)
        self.mlp_norm = RMSNorm(dim, eps, fused_kernels)
        if config.is_moe_layer(index):
            self.mlp = MoE(config, fused_kernels)
        else:
            self.mlp = SwiGLU(dim, config.ffn_hidden_size, fused_kernels)

    def init_weights(self, std: float, num_layers: int) -> None:
        self.attention_norm.init_weights()
        self.mlp_norm.init_weights()
        self.attention.init_weights(std)
        if isinstance(self.mlp, MoE):
            self.mlp.init_weights(std)
        else:
            self.mlp.init_weights(std, num_layers)

    def forward(self, x_bsd: torch.Tensor, rope: RotaryEmbedding,
                cache: Optional[LatentCache] = None) -> torch.Tensor:
        attended = self.attention(self.attention_norm(x_bsd), rope, cache)
        x_bsd, normed = self.mlp_norm.add_forward(attended, x_bsd)
        return x_bsd + self.mlp(normed)
