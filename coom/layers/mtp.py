"""Multi-Token Prediction (MTP), DeepSeek-V3 section 2.2.

Depth k predicts the token k + 1 places ahead. It takes the hidden state
of depth k - 1 at position i (the main model's for k = 1) and the embedding
of token i + k, normalises both, concatenates them (embedding first, as in
DeepSeek-V3's checkpoints), projects back to the model width and runs one
transformer block. Its own final norm and the model's shared output head
turn the result into logits. Each depth is one position shorter than the
one before, since the last positions have no token k ahead to read.

Tensor names end in their shape: b batch; s sequence; d model width.
"""
from typing import Optional

import torch
from torch import nn

from coom.config import ModelConfig
from coom.layers.block import Block
from coom.layers.mla import LatentCache
from coom.layers.norm import RMSNorm
from coom.layers.rope import RotaryEmbedding


class MTPModule(nn.Module):
    """One MTP depth.

    Args:
        config: the model config.
        index: the block index it takes in the checkpoint layout
            (num_layers + depth - 1), which decides dense or MoE.
        fused_kernels: let the layers call the fused ops.
    """

    def __init__(self, config: ModelConfig, index: int,
                 fused_kernels: bool = True):
        super().__init__()
        dim, eps = config.hidden_size, config.layernorm_epsilon
        self.enorm = RMSNorm(dim, eps, fused_kernels)
        self.hnorm = RMSNorm(dim, eps, fused_kernels)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = Block(config, index, fused_kernels)
        self.norm = RMSNorm(dim, eps, fused_kernels)

    def init_weights(self, std: float, num_layers: int) -> None:
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.init_weights()
        nn.init.normal_(self.eh_proj.weight, std=std)
        self.block.init_weights(std, num_layers)

    def forward(self, h_bsd: torch.Tensor, embedded_bsd: torch.Tensor,
                rope: RotaryEmbedding,
                cache: Optional[LatentCache] = None) -> torch.Tensor:
        """Hidden state of this depth (before its final norm)."""
        x_bsd = self.eh_proj(torch.cat(
            [self.enorm(embedded_bsd), self.hnorm(h_bsd)], dim=-1))
        return self.block(x_bsd, rope, cache)
