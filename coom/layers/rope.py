"""Rotary position embedding (RoPE) with optional YaRN scaling.

Channels (2i, 2i+1) of each head form one complex number that is rotated by
position * theta_i, as in DeepSeek-V3's ``apply_rotary_emb``. Without
``rope_interleave``, channels (i, i + k/2) form it instead, as in
Hugging Face's ``rotate_half``. MLA rotates only its ``qk_rope_head_dim``
channels.

YaRN (arXiv 2309.00071) stretches a trained context by
``rotary_scaling_factor``: frequencies that turn fewer than ``beta_slow``
times over the original context are divided by the factor, those turning
more than ``beta_fast`` times are kept, with a linear ramp between; cos and
sin are scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim),
or by mscale(factor, 1) when either coefficient is 0, as transformers
reads a config.json that leaves one out.

Built with ``fused_kernels`` the rotation calls the op of
``coom.kernels.rope`` (Triton on GPUs, the reference elsewhere), else the
plain reference.

Tensor names end in their shape: b batch; s sequence; h heads; k rotated
head dimension.
"""
import math

import torch
from torch import nn

from coom.config import ModelConfig
from coom.kernels.rope import rotate, rotate_reference


def yarn_mscale(factor: float, coefficient: float) -> float:
    """YaRN's attention temperature correction for a stretch of factor."""
    if factor <= 1:
        return 1.0
    return 0.1 * coefficient * math.log(factor) + 1.0


def yarn_attention_factor(config: ModelConfig) -> float:
    """YaRN's scale of cos and sin."""
    factor = config.rotary_scaling_factor
    if config.mscale and config.mscale_all_dim:
        return (yarn_mscale(factor, config.mscale)
                / yarn_mscale(factor, config.mscale_all_dim))
    return yarn_mscale(factor, 1.0)


def _yarn_inverse_frequencies(config: ModelConfig,
                              inv_freq: torch.Tensor) -> torch.Tensor:
    dim, base = config.qk_rope_head_dim, config.rotary_base
    context = config.original_max_position_embeddings

    def channel(rotations: float) -> float:
        """Rotary channel that turns ``rotations`` times over context."""
        return dim * math.log(context / (rotations * 2 * math.pi)) \
            / (2 * math.log(base))

    low = max(math.floor(channel(config.beta_fast)), 0)
    high = min(math.ceil(channel(config.beta_slow)), dim - 1)
    high = high if high > low else low + 1e-3
    index = torch.arange(dim // 2, dtype=inv_freq.dtype,
                         device=inv_freq.device)
    keep = 1 - ((index - low) / (high - low)).clamp(0, 1)
    factor = config.rotary_scaling_factor
    return inv_freq / factor * (1 - keep) + inv_freq * keep


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables and rotates query and key tensors.

    Args:
        config: the model config; reads qk_rope_head_dim,
            max_position_embeddings, rotary_base and the YaRN fields.
        fused_kernels: call the fused op rather than the reference.
    """

    def __init__(self, config: ModelConfig, fused_kernels: bool = True):
        super().__init__()
        self.config = config
        self.fused_kernels = fused_kernels
        half = config.qk_rope_head_dim // 2
        positions = config.max_position_embeddings
        self.register_buffer("cos_sk", torch.empty(positions, half),
                             persistent=False)
        self.register_buffer("sin_sk", torch.empty(positions, half),
                             persistent=False)

    def init_weights(self) -> None:
        config = self.config
        device = self.cos_sk.device
        dim = config.qk_rope_head_dim
        exponents = torch.arange(0, dim, 2, device=device).double() / dim
        inv_freq = config.rotary_base ** -exponents
        scale = 1.0
        if config.rope_type == "yarn":
            inv_freq = _yarn_inverse_frequencies(config, inv_freq)
            scale = yarn_attention_factor(config)
        positions = torch.arange(config.max_position_embeddings,
                                 device=device).double()
        angles = torch.outer(positions, inv_freq)
        self.cos_sk.copy_(angles.cos() * scale)
        self.sin_sk.copy_(angles.sin() * scale)

    def forward(self, x_bshk: torch.Tensor,
                start: int = 0) -> torch.Tensor:
        """Rotate x (b, s, h, k) as positions start .. start + s - 1."""
        if not self.config.rope_interleave:
            # Halves to interleaved pairs and back: the rotation itself
            # (and its kernel) knows one layout only.
            pairs = x_bshk.unflatten(-1, (2, -1)).transpose(-2, -1)
            rotated = self._rotate(pairs.flatten(-2), start)
            return rotated.unflatten(-1, (-1, 2)).transpose(-2, -1).flatten(-2)
        return self._rotate(x_bshk, start)

    def _rotate(self, x_bshk: torch.Tensor, start: int) -> torch.Tensor:
        rotation = rotate if self.fused_kernels else rotate_reference
        return rotation(x_bshk, self.cos_sk, self.sin_sk, start)
