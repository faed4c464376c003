"""parallelize(): the single-device model spread over the run's mesh,
applied from outside the model as torchtitan does, in this order:

1. Tensor parallelism (``parallelize_module`` over the "tp" dimension):
   in each block, MLA's query projection (``wq`` or ``wq_b``) and its
   key-value up-projection ``wkv_b`` split by heads (column-wise), its
   output projection ``wo`` row-wise; the dense and shared-expert
   feed-forwards split their hidden units (``w1``, ``w3`` column-wise,
   ``w2`` row-wise). A row-wise product all-reduces its output, so every
   process of the group holds the whole activation between them.
   Embedding, head, norms, MLA's latent projection ``wkv_a``, router and
   routed experts stay whole on every process; the gradient of the
   rotary key part of ``wkv_a``'s output, which every process's heads
   share, is summed over the group.
2. FSDP2 (``fully_shard``) over the data-parallel dimensions, on each
   block (main and MTP) and then on the whole model: each block's
   parameters are gathered just before it runs and its gradients
   reduce-scattered just after; the model's own parameters (embedding,
   head) are gathered by ``features`` and ``features_with_mtp``. With
   data_parallel_replicate > 1 the mesh has two dimensions (HSDP).

FSDP averages gradients over the data-parallel processes; each process's
loss is its share of the global batch's mean, so the trainer scales what
it differentiates by the number of data-parallel processes
(``coom.train.trainer``) and the average is the single-process gradient.
"""
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from coom.layers.mlp import SwiGLU
from coom.layers.moe import MoE
from coom.parallel.mesh import TENSOR, World


def _feed_forward_plan(prefix: str) -> dict:
    return {f"{prefix}.w1": ColwiseParallel(),
            f"{prefix}.w3": ColwiseParallel(),
            f"{prefix}.w2": RowwiseParallel()}


def _tensor_plan(block: nn.Module) -> dict:
    """Module names in a block and how each splits."""
    query = "wq" if hasattr(block.attention, "wq") else "wq_b"
    plan = {f"attention.{query}": ColwiseParallel(),
            "attention.wkv_b": ColwiseParallel(),
            "attention.wo": RowwiseParallel()}
    if isinstance(block.mlp, SwiGLU):
        plan |= _feed_forward_plan("mlp")
    elif isinstance(block.mlp, MoE) and block.mlp.shared_experts is not None:
        plan |= _feed_forward_plan("mlp.shared_experts")
    return plan


def _sum_gradient_over(mesh: DeviceMesh, x: torch.Tensor) -> torch.Tensor:
    """x unchanged; its gradient summed over mesh's processes."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False) \
        .to_local(grad_placements=[Partial()])


def _sum_rope_key_gradient(mesh: DeviceMesh, latent_width: int):
    """A forward hook for ``wkv_a``: each process attends with its own
    heads, all of which share the rotary key part of wkv_a's output, so
    that part's gradient is partial per process and is summed. (The
    latent part reaches the heads through ``wkv_b``, whose column-wise
    split sums its gradient already.)"""
    def hook(module, args, output_bsw):
        latent, rope = output_bsw.split(
            [latent_width, output_bsw.shape[-1] - latent_width], dim=-1)
        return torch.cat([latent, _sum_gradient_over(mesh, rope)], dim=-1)
    return hook


def parallelize(model: nn.Module, world: World) -> nn.Module:
    """model spread over world's mesh, in place; unchanged in a world of
    one."""
    if world.mesh is None:
        return model
    blocks = model.blocks()
    if world.tensor_size > 1:
        mesh = world.mesh[TENSOR]
        for block in blocks:
            parallelize_module(block, mesh, _tensor_plan(block))
            block.attention.wkv_a.register_forward_hook(
                _sum_rope_key_gradient(mesh, block.attention.kv_norm
                                       .weight.shape[0]))
    if world.data_size > 1:
        mesh = world.data_mesh()
        for module in [*blocks, model]:
            fully_shard(module, mesh=mesh)
        # The trainer runs the model through these rather than forward;
        # the root's parameters stay gathered until the backward.
        for method in ("features", "features_with_mtp"):
            register_fsdp_forward_method(model, method)
    return model
