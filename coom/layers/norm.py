"""RMSNorm, computed in float32 whatever the input dtype.

On GPUs it runs the fused Triton kernel of ``coom.kernels.rmsnorm``, which
can also add the residual first in the same pass.
"""
import torch
from torch import nn

from coom.kernels import use_kernels
from coom.kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_reference


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned per-channel scale.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernels(x):
            return rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, the norm of that sum), in one pass on GPUs."""
        if use_kernels(x):
            return add_rms_norm(x, residual, self.weight, self.eps)
        h = residual + x
        return h, rms_norm_reference(h, self.weight, self.eps)
