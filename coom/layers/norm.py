"""RMSNorm, computed in float32 whatever the input dtype.

Built with ``fused_kernels`` it calls the op of ``coom.kernels.rmsnorm``
(Triton on GPUs, which can also add the residual first in the same pass;
the reference elsewhere), else the plain reference.
"""
import torch
from torch import nn

from coom.kernels.rmsnorm import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned per-channel scale.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.
        fused_kernels: call the fused op rather than the reference.
    """

    def __init__(self, dim: int, eps: float, fused_kernels: bool = True):
        super().__init__()
        self.eps = eps
        self.fused_kernels = fused_kernels
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = rms_norm if self.fused_kernels else rms_norm_reference
        return norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, the norm of that sum), in one pass on GPUs."""
        add_norm = (add_rms_norm if self.fused_kernels
                    else add_rms_norm_reference)
        return add_norm(x, residual, self.weight, self.eps)
