"""The training loss of a micro-batch, from what the output head reads.

Each loss is summed over its tokens and divided by the tokens the whole
step has at that depth, so that the micro-batches' losses add up to the
step's mean, however the step is cut into micro-batches, data-parallel
shares or pipeline stages.

Tensor names end in their shape: b micro-batch; s sequence; d width; v
vocabulary.
"""
import torch

from coom import kernels
from coom.kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
)


def token_losses(features: list[torch.Tensor], head_vd: torch.Tensor,
                 labels_bs: torch.Tensor, mask_bs: torch.Tensor,
                 tokens_in_step: int) -> list[torch.Tensor]:
    """The language-model loss, then each MTP depth's.

    Args:
        features: what the head reads, the main model's (b, s, d) and
            each MTP depth k's (b, s - k, d), whose targets are
            labels_bs[:, k:].
        head_vd: the output head's weight.
        labels_bs, mask_bs: the micro-batch's targets and loss mask.
        tokens_in_step: tokens of the step at depth 0.
    """
    loss = linear_cross_entropy if kernels.use_kernels(labels_bs) \
        else linear_cross_entropy_reference
    length = labels_bs.shape[1]
    losses = []
    for depth, x_bsd in enumerate(features):
        share = (length - depth) / length
        scale_t = mask_bs[:, depth:].flatten() / (tokens_in_step * share)
        losses.append(loss(x_bsd.flatten(0, 1), head_vd,
                           labels_bs[:, depth:].flatten(), scale_t))
    return losses
