"""The SwiGLU feed-forward block.

On GPUs the gating ``silu(w1 x) * w3 x`` runs the fused Triton kernel of
``coom.kernels.swiglu``. Once w1 and w3 run in FP8 (``coom.fp8.convert``)
their products share one quantisation of x.
"""
import math

import torch
from torch import nn

from coom.fp8.linear import FP8Linear, fp8_linears
from coom.kernels import use_kernels
from coom.kernels.swiglu import swiglu, swiglu_reference


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), the feed-forward of Llama and DeepSeek.

    Args:
        dim: input and output width.
        hidden_dim: inner width.
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def init_weights(self, std: float, num_layers: int) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        nn.init.normal_(self.w3.weight, std=std)
        nn.init.normal_(self.w2.weight, std=std / math.sqrt(2 * num_layers))

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor,
                                                    torch.Tensor]:
        """(w1 x, w3 x); from one FP8 copy of x where both are FP8
        linears of one recipe. That path reads their weights directly,
        past any hooks on w1 and w3: it relies on FP8 not running under
        tensor parallelism (refused by the config), whose hooks split
        them."""
        w1, w3 = self.w1, self.w3
        if isinstance(w1, FP8Linear) and isinstance(w3, FP8Linear) \
                and w1.recipe == w3.recipe:
            return fp8_linears(x, [w1.weight, w3.weight], w1.recipe)
        return w1(x), w3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        if use_kernels(gate):
            return self.w2(swiglu(gate, up))
        return self.w2(swiglu_reference(gate, up))
