"""The output head split by vocabulary over the tensor-parallel group, and
its cross-entropy without gathering the logits (Megatron's vocabulary-
parallel cross-entropy; torch's ``loss_parallel`` for DTensor logits).

Each process holds a consecutive slice of the head's rows (a DTensor
``Shard(0)``) and computes its slice of each token's logits. The loss
needs three sums over the whole vocabulary, each an all-reduce of one
number per token: the largest logit (for a stable exponent), the sum of
exponentials, and the target's logit, which only the process holding
the target's row contributes. The backward is the softmax minus the
target's one-hot, each process for its own columns; the features'
gradient, partial per process, is summed over the group.

Tensor names end in their shape: t tokens; d width; v this process's
vocabulary rows.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.nn import functional

from coom.layers.head import OutputHead


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """sum over tokens of scale_t * cross-entropy, from each process's
    logits_tv of the vocabulary rows from start."""

    @staticmethod
    def forward(ctx, logits_tv, labels_t, scale_t, start, group):
        maximum_t = logits_tv.max(dim=-1).values
        dist.all_reduce(maximum_t, op=dist.ReduceOp.MAX, group=group)
        exp_tv = (logits_tv - maximum_t[:, None]).exp()
        sum_t = exp_tv.sum(dim=-1)
        dist.all_reduce(sum_t, group=group)
        rows = logits_tv.shape[-1]
        here_t = (labels_t >= start) & (labels_t < start + rows)
        index_t = (labels_t - start).clamp(0, rows - 1)
        target_t = logits_tv.gather(1, index_t[:, None]).squeeze(1)
        target_t = torch.where(here_t, target_t - maximum_t, 0.0)
        dist.all_reduce(target_t, group=group)
        loss_t = sum_t.log() - target_t
        ctx.save_for_backward(exp_tv / sum_t[:, None], index_t, here_t,
                              scale_t)
        return (loss_t * scale_t).sum()

    @staticmethod
    def backward(ctx, grad):
        softmax_tv, index_t, here_t, scale_t = ctx.saved_tensors
        grad_tv = softmax_tv.clone()
        grad_tv.scatter_add_(1, index_t[:, None],
                             -here_t[:, None].to(grad_tv.dtype))
        grad_tv *= (scale_t * grad)[:, None]
        return grad_tv, None, None, None, None


def vocab_parallel_cross_entropy(x_td: torch.Tensor, head_vd: DTensor,
                                 labels_t: torch.Tensor,
                                 scale_t: torch.Tensor) -> torch.Tensor:
    """``linear_cross_entropy_reference`` for a head split by rows over a
    one-dimensional mesh (the tensor-parallel group); x_td whole on each
    process. Every process returns the whole loss."""
    mesh = head_vd.device_mesh
    weight_vd = head_vd.to_local()
    # Rows split as torch.chunk does: ceil(v / processes) each.
    per_process = -(-head_vd.shape[0] // mesh.size())
    start = mesh.get_local_rank() * per_process
    x_td = DTensor.from_local(x_td, mesh, [Replicate()], run_check=False) \
        .to_local(grad_placements=[Partial()])
    logits_tv = functional.linear(x_td, weight_vd).float()
    return _VocabParallelCrossEntropy.apply(
        logits_tv, labels_t, scale_t.float(), start, mesh.get_group())


class VocabParallelHead(OutputHead):
    """head with its weight (if not tied to the embedding, which tensor
    parallelism splits by rows too) split by rows over mesh, and the
    vocabulary-parallel loss.

    Args:
        head: the model's head, whose weight it takes.
        mesh: the tensor-parallel group's one-dimensional mesh.
    """

    def __init__(self, head: OutputHead, mesh: DeviceMesh):
        nn.Module.__init__(self)
        self.weight = None
        if head.weight is not None:
            self.weight = nn.Parameter(distribute_tensor(
                head.weight.detach(), mesh, [Shard(0)]))

    def cross_entropy(self, x_td: torch.Tensor, weight_vd: DTensor,
                      labels_t: torch.Tensor,
                      scale_t: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(x_td, weight_vd, labels_t,
                                            scale_t)
