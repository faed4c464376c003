"""Expert parallelism: the routed experts split by expert over the "ep"
mesh dimension, and each MoE layer's token copies sent to the process
that holds their expert and back.

The MoE layer (``coom.layers.moe``) routes, permutes its token copies
into expert order and calls ``GroupedExperts(x_cd, counts_e)``; it knows
nothing of processes. ``expert_parallel`` wraps that call from outside,
with PyTorch's ``distribute_module``:

- the weights w1, w2, w3 become DTensors of ``Shard(0)`` over "ep":
  process r of the group keeps experts [r * l, (r + 1) * l);
- before the experts run, ``AllToAll.dispatch`` sends each process the
  copies routed to its experts. The copies arrive sorted by expert, so
  the ones for each destination are already one contiguous block, and
  one all-to-all with variable split sizes moves them. Received, they
  are grouped by source process, then local expert; they are reordered
  to local expert, then source, so that each expert's rows are
  consecutive for the grouped product;
- after, ``AllToAll.combine`` undoes both, and the MoE layer weighs and
  sums the copies as in one process.

The all-to-alls are ``all_to_all_single_autograd``: the backward is the
reverse exchange, so each expert's weight gradient is the sum over the
tokens of every process of its group, and the gradient of each copy
returns to the process it came from. The dispatcher is the one seam a
faster one (DeepEP) needs: anything with the same ``dispatch`` and
``combine`` fits.

Tensor names end in their shape: c token copies this process routed;
r copies it received; e routed experts; l experts per process (e / ep);
p processes of the group; d model width.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._functional_collectives import (
    all_to_all_single,
    all_to_all_single_autograd,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    Shard,
    distribute_module,
    distribute_tensor,
)


@dataclass
class Dispatched:
    """What combine needs to send a dispatch's rows back."""

    sent: list[int]
    """Rows sent to each process of the group."""

    received: list[int]
    """Rows received from each."""

    order_r: torch.Tensor
    """Row i of the expert-ordered rows is received row order_r[i]."""


def _expert_order(counts_pl: torch.Tensor, rows: int) -> torch.Tensor:
    """Received rows (as many as counts_pl sums to), grouped by source
    process p then local expert l, reordered by l then p: the received
    row each position takes."""
    starts_pl = counts_pl.flatten().cumsum(0).view_as(counts_pl) - counts_pl
    counts_lp, starts_lp = counts_pl.T.flatten(), starts_pl.T.flatten()
    # Each (l, p) block's rows: its start among the received rows, plus
    # the position within the block.
    block_starts = counts_lp.cumsum(0) - counts_lp
    return torch.arange(rows, device=counts_pl.device) \
        + (starts_lp - block_starts).repeat_interleave(counts_lp,
                                                       output_size=rows)


class AllToAll:
    """Dispatch and combine with all-to-alls over one mesh dimension.

    Args:
        mesh: the expert-parallel mesh (one dimension).
    """

    def __init__(self, mesh: DeviceMesh):
        self.group = mesh.get_group()
        self.size = mesh.size()

    def dispatch(self, x_cd: torch.Tensor, counts_e: torch.Tensor):
        """Copies sorted by expert, counts_e per (global) expert, to this
        process's experts: returns their rows sorted by local expert,
        the count per local expert (l,) and what combine needs."""
        with torch.no_grad():
            # Counts per (destination, local expert) in; per (source,
            # local expert) out.
            counts_pl = all_to_all_single(
                counts_e, None, None, self.group).view(self.size, -1)
            sent = counts_e.view(self.size, -1).sum(1).tolist()
            received = counts_pl.sum(1).tolist()
            order_r = _expert_order(counts_pl, sum(received))
        x_rd = all_to_all_single_autograd(x_cd, received, sent, self.group)
        return x_rd[order_r], counts_pl.sum(0), \
            Dispatched(sent, received, order_r)

    def combine(self, y_rd: torch.Tensor, state: Dispatched) -> torch.Tensor:
        """The experts' output rows (in dispatch's order) back to the
        processes and rows their copies came from."""
        unordered_r = torch.empty_like(state.order_r)
        unordered_r[state.order_r] = torch.arange(
            len(unordered_r), device=unordered_r.device)
        return all_to_all_single_autograd(y_rd[unordered_r], state.sent,
                                          state.received, self.group)


def _shard_by_expert(name: str, module: nn.Module, mesh: DeviceMesh):
    for weight_name, weight in module.named_parameters(recurse=False):
        module.register_parameter(weight_name, nn.Parameter(
            distribute_tensor(weight, mesh, [Shard(0)])))


def expert_parallel(experts: nn.Module, mesh: DeviceMesh) -> None:
    """Split a ``GroupedExperts`` by expert over mesh, and wrap its
    forward in dispatch and combine; in place."""
    dispatcher = AllToAll(mesh)
    # A forward's dispatch state, until its combine.
    pending = []

    def dispatch(module, inputs, device_mesh):
        x_rd, counts_l, state = dispatcher.dispatch(*inputs)
        pending.append(state)
        return x_rd, counts_l

    def combine(module, y_rd, device_mesh):
        return dispatcher.combine(y_rd, pending.pop())

    distribute_module(experts, mesh, _shard_by_expert, dispatch, combine)
