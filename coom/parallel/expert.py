"""Expert parallelism: the routed experts split by expert over the "ep"
mesh dimension, and each MoE layer's token copies sent to the process
that holds their expert and back.

The MoE layer (``coom.layers.moe``) routes, permutes its token copies
into expert order and calls its experts, ``experts(x_cd, counts_e)``; it
knows nothing of processes. ``ExpertParallel`` replaces those experts
from outside (``coom.parallel.parallelize``), and owns the rest:

- the weights w1, w2, w3 become DTensors of ``Shard(0)`` over "ep", under
  the same names: process r of the group keeps experts [r * l, (r + 1) *
  l);
- before the experts run, ``AllToAll.dispatch`` sends each process the
  copies routed to its experts. The copies arrive sorted by expert, so
  the ones for each destination are already one contiguous block, and
  one all-to-all with variable split sizes moves them. Its sizes come
  from an exchange of the counts on the device, which the host reads
  once per layer. While the copies travel, the layer's shared experts
  run (the ``beside`` of the experts' call). Received, the copies
  are grouped by source process, then local expert; they are reordered
  to local expert, then source, so that each expert's rows are
  consecutive for the grouped product;
- the replaced module runs this process's slots, given their (local)
  weights;
- after, ``AllToAll.combine`` undoes both, and the MoE layer weighs and
  sums the copies as in one process.

With ``fp8.dispatch`` the copies travel in FP8 (``coom.fp8.dispatch``):
E4M3 bytes and float32 tile scales, expanded back on arrival, as one
process rounds them; gradients and the combine travel as they are.

With a placement (``coom.parallel.placement``, applied by ``place``)
each process holds ``slots_per_rank`` expert slots instead of its own l
experts, and a hot expert may have a copy in several processes' slots.
Dispatch then first spreads each expert's copies evenly over its
replicas (``spread_over_replicas``) and sorts them by slot; the rest is the
same, slots in place of experts. Each forward, ``slot_weights`` fetches
every slot's weights from the process that owns its expert, with one
more all-to-all; its backward sends each replica's gradient back to the
owner, which sums them. So the weights, their gradients and the
optimizer stay as without a placement, and so does what the model
computes.

The all-to-alls are ``all_to_all_single_autograd``: the backward is the
reverse exchange, so each expert's weight gradient is the sum over the
tokens of every process of its group, and the gradient of each copy
returns to the process it came from. The dispatcher is the one seam a
faster one (DeepEP) needs: anything with the same ``dispatch`` and
``combine`` fits.

Tensor names end in their shape: c token copies this process routed;
r copies it received; e routed experts; s the group's expert slots
(its experts, or a placement's slots); l slots per process (e / ep
without a placement); p processes of the group; d model width.
"""
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed._functional_collectives import (
    all_to_all_single,
    all_to_all_single_autograd,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from coom.fp8.dispatch import FP8Rows, InFlight
from coom.fp8.modules import FP8GroupedExperts
from coom.layers.moe import Copies, GroupedExperts, MoE, rows_of
from coom.parallel.placement import (
    Placement,
    PlacementError,
    spread_over_replicas,
)

PLACEMENT = "expert_placement"
"""Train-state key of a placement with copies (``place_experts``)."""


@dataclass
class Dispatched:
    """What combine needs to send a dispatch's rows back."""

    sent: list[int]
    """Rows sent to each process of the group."""

    received: list[int]
    """Rows received from each."""

    order_r: torch.Tensor
    """Row i of the slot-ordered rows is received row order_r[i]."""

    order_c: Optional[torch.Tensor]
    """With a placement: row i sent is routed copy order_c[i]."""

    def by_slot(self, x_rd: torch.Tensor | InFlight) -> torch.Tensor:
        """The received rows (or those still in FP8 flight) sorted by
        local slot, once they have arrived: work queued before this call
        overlaps their journey."""
        if isinstance(x_rd, InFlight):
            x_rd = x_rd.arrived()
        return x_rd[self.order_r]


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes order."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse


def _expert_order(counts_pl: torch.Tensor, rows: int) -> torch.Tensor:
    """Received rows (as many as counts_pl sums to), grouped by source
    process p then local slot l, reordered by l then p: the received
    row each position takes."""
    starts_pl = counts_pl.flatten().cumsum(0).view_as(counts_pl) - counts_pl
    counts_lp, starts_lp = counts_pl.T.flatten(), starts_pl.T.flatten()
    # Each (l, p) block's rows: its start among the received rows, plus
    # the position within the block.
    block_starts = counts_lp.cumsum(0) - counts_lp
    return torch.arange(rows, device=counts_pl.device) \
        + (starts_lp - block_starts).repeat_interleave(counts_lp,
                                                       output_size=rows)


@dataclass(frozen=True)
class WeightRoutes:
    """How one process's slots get their weights under a placement:
    process o owns experts [o * l, (o + 1) * l), l = e / ranks."""

    send_rows: torch.Tensor
    """Own experts' rows to send, grouped by destination process."""

    sent: list[int]
    """Rows sent to each process."""

    received: list[int]
    """Rows received from each process (owner)."""

    slot_rows: torch.Tensor
    """Slot j's weights are received row slot_rows[j]."""

    @classmethod
    def plan(cls, placement: Placement, rank: int) -> "WeightRoutes":
        owned = placement.experts // placement.ranks
        width = placement.slots_per_rank

        def slots_of(process):
            return placement.slot_expert[process * width:
                                         (process + 1) * width]

        send_rows, sent = [], []
        for process in range(placement.ranks):
            rows = [expert % owned for expert in slots_of(process)
                    if expert // owned == rank]
            send_rows += rows
            sent.append(len(rows))
        mine = slots_of(rank)
        # Rows arrive by owner, each owner's in slot order.
        arrival = sorted(range(width), key=lambda j: (mine[j] // owned, j))
        received = [sum(expert // owned == owner for expert in mine)
                    for owner in range(placement.ranks)]
        return cls(torch.tensor(send_rows, dtype=torch.long), sent,
                   received, _inverse(torch.tensor(arrival)))

    def to(self, device: torch.device) -> "WeightRoutes":
        return replace(self, send_rows=self.send_rows.to(device),
                       slot_rows=self.slot_rows.to(device))


class AllToAll:
    """Dispatch and combine with all-to-alls over one mesh dimension.

    Args:
        mesh: the expert-parallel mesh (one dimension).
        experts: the routed experts of the layer.
        transport: how the rows travel in FP8 (``coom.fp8.dispatch``),
            or None: as they are. Their gradients travel as they are.
    """

    def __init__(self, mesh: DeviceMesh, experts: int,
                 transport: Optional[FP8Rows] = None):
        self.transport = transport
        self.group = mesh.get_group()
        self.size = mesh.size()
        self.rank = mesh.get_local_rank()
        self.experts = experts
        self.placement: Optional[Placement] = None
        self.routes: Optional[WeightRoutes] = None
        self.tables: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def place(self, placement: Optional[Placement]) -> None:
        """From the next forward, send copies to placement's slots and
        fetch each slot's weights from its expert's owner; None: each
        process runs its own experts."""
        if placement is not None and (placement.ranks != self.size
                                      or placement.experts != self.experts):
            raise PlacementError(
                f"placement: planned for {placement.experts} experts on "
                f"{placement.ranks} ranks, but this layer has "
                f"{self.experts} experts on {self.size} ranks")
        self.placement = placement
        self.routes = None if placement is None \
            else WeightRoutes.plan(placement, self.rank)
        # The placement's replicas and replica slots, on the device.
        self.tables = None

    def _to_slots(self, counts_e: torch.Tensor, copies: int):
        """Counts per slot (s,) and the copies' order by slot."""
        placement, device = self.placement, counts_e.device
        if self.tables is None or self.tables[0].device != device:
            self.tables = (placement.replicas(device),
                           placement.replica_slots(device))
        experts_c = torch.repeat_interleave(
            torch.arange(self.experts, device=device), counts_e,
            output_size=copies)
        slots_c = spread_over_replicas(experts_c, *self.tables, self.rank)
        counts_s = torch.zeros(placement.slots, dtype=counts_e.dtype,
                               device=counts_e.device)
        counts_s.scatter_add_(0, slots_c, torch.ones_like(slots_c))
        return counts_s, slots_c.argsort(stable=True)

    def dispatch(self, x_cd: torch.Tensor, counts_e: torch.Tensor):
        """Copies sorted by expert, counts_e per (global) expert, to this
        process's slots: returns their rows as they arrive, grouped by
        source process (still in flight: ``Dispatched.by_slot`` waits
        for them and sorts them by local slot), the count per local slot
        (l,) and what combine needs. Sent in FP8, the rows come as
        ``InFlight``, which ``by_slot`` takes as well."""
        with torch.no_grad():
            counts_s, order_c = counts_e, None
            if self.placement is not None:
                counts_s, order_c = self._to_slots(counts_e, len(x_cd))
            # Counts per (destination, local slot) in; per (source, local
            # slot) out.
            counts_pl = all_to_all_single(
                counts_s, None, None, self.group).view(self.size, -1)
            # The host reads the rows to send and to receive at once: the
            # layer's one wait for the device.
            sizes = torch.cat([counts_s.view(self.size, -1).sum(1),
                               counts_pl.sum(1)]).tolist()
            sent, received = sizes[:self.size], sizes[self.size:]
            order_r = _expert_order(counts_pl, sum(received))
        if order_c is not None:
            x_cd = x_cd[order_c]
        if self.transport is not None:
            x_rd = self.transport.send(x_cd, received, sent, self.group)
        else:
            x_rd = all_to_all_single_autograd(x_cd, received, sent,
                                              self.group)
        return x_rd, counts_pl.sum(0), \
            Dispatched(sent, received, order_r, order_c)

    def combine(self, y_rd: torch.Tensor, state: Dispatched) -> torch.Tensor:
        """The experts' output rows (in dispatch's order) back to the
        processes and rows their copies came from."""
        y_cd = all_to_all_single_autograd(y_rd[_inverse(state.order_r)],
                                          state.sent, state.received,
                                          self.group)
        if state.order_c is None:
            return y_cd
        return y_cd[_inverse(state.order_c)]

    def slot_weights(self, *weights_l: torch.Tensor) -> tuple:
        """This process's experts' weights (l, ...) each, as those of its
        slots: fetched from their owners under a placement, else as
        they are."""
        if self.routes is None:
            return weights_l
        if self.routes.send_rows.device != weights_l[0].device:
            self.routes = self.routes.to(weights_l[0].device)
        routes = self.routes
        sent_rows = torch.cat([weight[routes.send_rows].flatten(1)
                               for weight in weights_l], 1)
        arrived = all_to_all_single_autograd(sent_rows, routes.received,
                                             routes.sent, self.group)
        slots = arrived[routes.slot_rows]
        sizes = [weight[0].numel() for weight in weights_l]
        return tuple(part.view(-1, *weight.shape[1:]) for part, weight
                     in zip(slots.split(sizes, 1), weights_l))


class ExpertParallel(nn.Module):
    """Routed experts split by expert over mesh, in place of a
    ``GroupedExperts`` (or its FP8 replacement): its weights w1, w3, w2,
    under the same names, become DTensors of ``Shard(0)``. The replaced
    module, kept as ``local`` without weights of its own, runs this
    process's slots with the weights it is given.

    Args:
        experts: the module replaced; its weights move here.
        mesh: the expert-parallel mesh (one dimension).
    """

    def __init__(self, experts: GroupedExperts, mesh: DeviceMesh):
        super().__init__()
        for name, weight in list(experts.named_parameters(recurse=False)):
            delattr(experts, name)
            self.register_parameter(name, nn.Parameter(
                distribute_tensor(weight, mesh, [Shard(0)])))
        self.local = experts
        transport = experts.transport \
            if isinstance(experts, FP8GroupedExperts) else None
        self.dispatcher = AllToAll(mesh, self.w1.shape[0], transport)

    def forward(self, x_cd: torch.Tensor | Copies, counts_e: torch.Tensor,
                beside: Optional[Callable[[], torch.Tensor]] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The experts' SwiGLU of the copies sorted by expert (made here
        from ``Copies``), counts_e per (global) expert, computed by the
        processes holding them; and beside's result
        (``GroupedExperts.forward``), computed while the copies travel to
        them."""
        x_rd, counts_l, state = self.dispatcher.dispatch(rows_of(x_cd),
                                                         counts_e)
        besides = None if beside is None else beside()
        weights = self.dispatcher.slot_weights(
            *(weight.to_local() for weight in (self.w1, self.w3, self.w2)))
        y_rd = self.local.run(state.by_slot(x_rd), counts_l, *weights)
        return self.dispatcher.combine(y_rd, state), besides

    def place(self, placement: Optional[Placement]) -> None:
        """From the next forward, run placement's slots (``AllToAll.place``;
        None: each process runs its own experts)."""
        self.dispatcher.place(placement)


def place_experts(moe_layers: dict[int, MoE],
                  placements: dict) -> Optional[str]:
    """Apply placements ({"ranks": R, "layers": {block index: slot
    expert ids}}, as ``coom experts rebalance --redundant`` saves them)
    to the expert-parallel MoE layers of this process; returns why they
    do not fit this run (then nothing changes), or None."""
    ranks, layers = placements["ranks"], placements["layers"]
    plans = {}
    for index, moe in moe_layers.items():
        size = 1
        if isinstance(moe.experts, ExpertParallel):
            size = moe.experts.dispatcher.size
        if size != ranks:
            return (f"planned for {ranks} expert-parallel ranks, this run "
                    f"has {size}")
        if index not in layers:
            return f"no placement for MoE block {index}"
        try:
            plans[index] = Placement(layers[index], ranks,
                                     moe.experts.dispatcher.experts)
        except PlacementError as error:
            return f"block {index}: {error}"
    for index, placement in plans.items():
        moe_layers[index].experts.place(placement)
    return None
