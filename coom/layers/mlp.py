"""The SwiGLU feed-forward block.

Built with ``fused_kernels`` the gating ``silu(w1 x) * w3 x`` calls the op
of ``coom.kernels.swiglu`` (Triton on GPUs, the reference elsewhere),
else the plain reference. FP8 replaces the block (``coom.fp8.convert``)
with one whose w1 and w3 share one quantisation of x.
"""
import math

import torch
from torch import nn

from coom.kernels.swiglu import swiglu, swiglu_reference
from coom.layers.recompute import direct


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), the feed-forward of Llama and DeepSeek.

    Args:
        dim: input and output width.
        hidden_dim: inner width.
        fused_kernels: call the fused gating op rather than the reference.
    """

    def __init__(self, dim: int, hidden_dim: int,
                 fused_kernels: bool = True):
        super().__init__()
        self.fused_kernels = fused_kernels
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.recompute = direct

    def init_weights(self, std: float, num_layers: int) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        nn.init.normal_(self.w3.weight, std=std)
        nn.init.normal_(self.w2.weight, std=std / math.sqrt(2 * num_layers))

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor,
                                                    torch.Tensor]:
        """(w1 x, w3 x)."""
        return self.w1(x), self.w3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recompute(self.feed_forward, x)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What forward computes."""
        gate, up = self.gate_and_up(x)
        gating = swiglu if self.fused_kernels else swiglu_reference
        return self.w2(gating(gate, up))
