"""What a training step differentiates, from the model's losses.

The model returns, per micro-batch, the language-model loss and each
Multi-Token Prediction depth's, each summed over its tokens and divided
by the tokens the whole step has (``Transformer.forward``), so that the
micro-batches' losses add up to the step's mean, however the step is cut
into micro-batches, data-parallel shares or pipeline stages. The MoE
layers attach their auxiliary losses' gradient themselves.
"""
import torch


def training_objective(losses_k: torch.Tensor, mtp_weight: float,
                       data_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a micro-batch differentiates, from its losses (the main
    model's, then each MTP depth's), and (detached) its language-model
    loss and MTP depths' mean for the step's sums.

    The objective is multiplied by the data-parallel processes, since
    FSDP averages their gradients (``coom.parallel.parallelize``).
    """
    main, mtp = losses_k[0], losses_k[1:]
    mtp_mean = mtp.sum() / len(mtp) if len(mtp) else torch.zeros_like(main)
    objective = main + mtp_weight * mtp_mean if len(mtp) else main
    parts = torch.stack([main, mtp_mean]).detach()
    return objective * data_size, parts
