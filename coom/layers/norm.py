"""RMSNorm, computed in float32 whatever the input dtype."""
import torch
from torch import nn


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
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).type_as(x)
