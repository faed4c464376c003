"""The output head and its loss, as one module that parallelism replaces.

Given only features, the head returns logits. Given labels, it returns
the sum over tokens of each token's cross-entropy times its weight,
without keeping the logits whole: the op of ``coom.kernels.cross_entropy``
(Triton on GPUs, the same chunks in PyTorch on CPUs); with
``fused_kernels`` off, the reference that materialises them. Tensor
parallelism replaces the head by ``coom.parallel.vocab.VocabParallelHead``,
whose loss sums over the vocabulary split across the group.

Tensor names end in their shape: b batch; s sequence; d width; v
vocabulary; t tokens (b * s).
"""
from typing import Optional

import torch
from torch import nn
from torch.nn import functional

from coom.kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
)


class OutputHead(nn.Module):
    """Features (b, s, d) to logits (b, s, v) or to a weighted loss.

    Args:
        width, vocab: the model's width and vocabulary size.
        tied: whether the embedding serves as the head, whose weight the
            model then passes in; otherwise the head holds its own.
        fused_kernels: whether the loss runs the fused op or the plain
            reference.
    """

    def __init__(self, width: int, vocab: int, tied: bool,
                 fused_kernels: bool = True):
        super().__init__()
        self.weight = None if tied else nn.Parameter(
            torch.empty(vocab, width))
        self.fused_kernels = fused_kernels

    def init_weights(self, std: float) -> None:
        if self.weight is not None:
            nn.init.normal_(self.weight, std=std)

    def cross_entropy(self, x_td: torch.Tensor, weight_vd: torch.Tensor,
                      labels_t: torch.Tensor,
                      scale_t: torch.Tensor) -> torch.Tensor:
        """sum_t scale_t * cross_entropy(x_t @ weight^T, label_t)."""
        loss = linear_cross_entropy if self.fused_kernels \
            else linear_cross_entropy_reference
        return loss(x_td, weight_vd, labels_t, scale_t)

    def forward(self, x_bsd: torch.Tensor,
                weight_vd: Optional[torch.Tensor] = None,
                labels_bs: Optional[torch.Tensor] = None,
                scale_bs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of x, or given labels and each token's weight in
        scale_bs, the weighted sum of the tokens' losses. weight_vd is
        the tied embedding's, when the head has none of its own."""
        weight_vd = self.weight if weight_vd is None else weight_vd
        if labels_bs is None:
            return functional.linear(x_bsd, weight_vd)
        return self.cross_entropy(x_bsd.flatten(0, 1), weight_vd,
                                  labels_bs.flatten(), scale_bs.flatten())
