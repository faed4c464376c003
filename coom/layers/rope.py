"""Rotary position embedding (RoPE) in the interleaved-pair convention.

Channels (2i, 2i+1) of each head form one complex number that is rotated by
position * base^(-2i/dim), as in DeepSeek-V3's ``apply_rotary_emb``.

Tensor names end in their shape: b batch; s sequence; h heads; k rotated
head dimension.
"""
import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables and rotates query and key tensors.

    Args:
        dim: rotated channels per head (even).
        max_positions: longest sequence the tables cover.
        base: the rotary base (rope_theta).
    """

    def __init__(self, dim: int, max_positions: int, base: float):
        super().__init__()
        self.dim = dim
        self.max_positions = max_positions
        self.base = base
        self.register_buffer("cos_sk", torch.empty(max_positions, dim // 2),
                             persistent=False)
        self.register_buffer("sin_sk", torch.empty(max_positions, dim // 2),
                             persistent=False)

    def init_weights(self) -> None:
        device = self.cos_sk.device
        exponents = torch.arange(0, self.dim, 2, device=device) / self.dim
        inv_freq = self.base ** -exponents.double()
        positions = torch.arange(self.max_positions, device=device).double()
        angles = torch.outer(positions, inv_freq)
        self.cos_sk.copy_(angles.cos())
        self.sin_sk.copy_(angles.sin())

    def forward(self, x_bshk: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, S, H, K) by the positions 0..S-1."""
        seq = x_bshk.shape[1]
        cos = self.cos_sk[:seq, None, :]
        sin = self.sin_sk[:seq, None, :]
        pairs = x_bshk.float().unflatten(-1, (-1, 2))
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack(
            (real * cos - imag * sin, real * sin + imag * cos), dim=-1)
        return rotated.flatten(-2).type_as(x_bshk)
