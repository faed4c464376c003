"""The logits of the main model and of each Multi-Token Prediction depth,
which the model's forward turns into losses without returning: read off
what its output head receives."""
import torch
from torch.nn import functional

from coom.models import Transformer


@torch.no_grad()
def depth_logits(model: Transformer, tokens_bs: torch.Tensor,
                 labels_bs: torch.Tensor) -> list[torch.Tensor]:
    """Logits of the main model (b, s, v) and of each MTP depth k
    (b, s - k, v), whose targets are labels_bs[:, k:], from one training
    forward (MTP runs in training only; the MoE layers count its load)."""
    seen = []

    def read(head, args, output):
        x_bsd, tied_vd = args[:2]
        weight_vd = head.weight if tied_vd is None else tied_vd
        seen.append(functional.linear(x_bsd, weight_vd))

    training = model.training
    handle = model.head.register_forward_hook(read)
    try:
        model.train()(tokens_bs, labels_bs=labels_bs)
    finally:
        handle.remove()
        model.train(training)
    return seen
