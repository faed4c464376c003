"""parallelize(): the single-device model spread over the run's mesh,
applied from outside the model as torchtitan does.

Today the data-parallel dimensions only: FSDP2 (``fully_shard``) on each
transformer block (main and MTP) and then on the whole model, which
gathers each block's parameters just before it runs and reduce-scatters
its gradients just after; the model's own parameters (embedding, head)
are gathered by ``features`` and ``features_with_mtp``. With
data_parallel_replicate > 1 the mesh has two dimensions (HSDP).

FSDP averages gradients over the data-parallel processes; each process's
loss is its share of the global batch's mean, so the trainer scales what
it differentiates by the number of processes (``coom.train.trainer``)
and the average is the single-process gradient.
"""
from torch import nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from coom.parallel.mesh import World


def parallelize(model: nn.Module, world: World) -> nn.Module:
    """model, its parameters sharded over world's data-parallel mesh;
    unchanged in a world of one."""
    if world.mesh is None:
        return model
    mesh = world.data_mesh()
    blocks = [*model.layers, *(module.block for module in model.mtp)]
    for module in [*blocks, model]:
        fully_shard(module, mesh=mesh)
    # The trainer runs the model through these rather than forward; the
    # root's parameters (embedding, head) stay gathered until backward.
    for method in ("features", "features_with_mtp"):
        register_fsdp_forward_method(model, method)
    return model
