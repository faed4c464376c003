"""The training loss of a micro-batch, from what the output head reads.

Each loss is summed over its tokens and divided by the tokens the whole
step has at that depth, so that the micro-batches' losses add up to the
step's mean, however the step is cut into micro-batches, data-parallel
shares or pipeline stages.

Tensor names end in their shape: b micro-batch; s sequence; d width; v
vocabulary.
"""
import torch
from torch.distributed.tensor import DTensor

from coom.kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from coom.parallel.vocab import vocab_parallel_cross_entropy


def token_losses(features: list[torch.Tensor], head_vd: torch.Tensor,
                 labels_bs: torch.Tensor, mask_bs: torch.Tensor,
                 tokens_in_step: int,
                 fused: bool = True) -> list[torch.Tensor]:
    """The language-model loss, then each MTP depth's.

    Args:
        features: what the head reads, the main model's (b, s, d) and
            each MTP depth k's (b, s - k, d), whose targets are
            labels_bs[:, k:].
        head_vd: the output head's weight, whole or (tensor
            parallelism) split by vocabulary.
        labels_bs, mask_bs: the micro-batch's targets and loss mask.
        tokens_in_step: tokens of the step at depth 0.
        fused: the fused loss op rather than the reference.
    """
    loss = linear_cross_entropy if fused \
        else linear_cross_entropy_reference
    if isinstance(head_vd, DTensor):  # split by vocabulary
        loss = vocab_parallel_cross_entropy
    length = labels_bs.shape[1]
    losses = []
    for depth, x_bsd in enumerate(features):
        share = (length - depth) / length
        scale_t = mask_bs[:, depth:].flatten() / (tokens_in_step * share)
        losses.append(loss(x_bsd.flatten(0, 1), head_vd,
                           labels_bs[:, depth:].flatten(), scale_t))
    return losses


def micro_batch_objective(losses: list[torch.Tensor], aux: torch.Tensor,
                          mtp_weight: float, data_size: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """What a micro-batch differentiates, from its ``token_losses`` and
    its share of the auxiliary losses, and (detached) its language-model
    loss, MTP depths' mean and auxiliary loss for the step's sums.

    The objective is multiplied by the data-parallel processes, since
    FSDP averages their gradients (``coom.parallel.parallelize``).
    """
    main, *mtp = losses
    aux = aux.to(main)
    objective = main + aux
    mtp_mean = sum(mtp) / len(mtp) if mtp else torch.zeros_like(main)
    if mtp:
        objective = objective + mtp_weight * mtp_mean
    parts = torch.stack([main, mtp_mean, aux]).detach()
    return objective * data_size, parts
