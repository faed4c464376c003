"""``coom experts rebalance``: a run's expert placement planned from the
load it measured, applied to its latest checkpoint.

Expert parallelism over R ranks puts expert i on rank i // (e / R). Under
a skewed load some ranks then get far more tokens than others. Which
expert is called i is arbitrary, though: renumbering a layer's routed
experts (their weights, router rows, router biases and Adam moments
together) changes nothing the model computes, only which rank holds
which expert. So a placement without redundant copies
(``coom.parallel.placement.plan_placement``) is applied by renumbering
each MoE layer's experts in its slot order, at a checkpoint boundary:

1. the per-expert load of each MoE layer is summed over the run's logged
   steps since the last rebalance (``moe_load_layerN`` in metrics.jsonl);
2. each layer's placement over ``ranks`` is planned from it;
3. the latest checkpoint is loaded whole, renumbered, and published as
   ``step_N-rebalanced``, the run's latest
   (``coom.checkpoint.transform``); ``coom train --resume`` continues
   from it, at any layout.

With ``redundant`` copies per layer the placement has more slots than
experts, which renumbering alone cannot express: the experts are
renumbered so that each rank owns most of the experts its slots hold
(``local_numbering``), and the slots, in the new numbers, are saved in
the checkpoint's train state (``expert_placement``). A resume with
expert parallelism over the same ranks applies them
(``coom.parallel.expert.place_experts``): each slot's weights are then
fetched from their owner every step, and the owners' weights, gradients
and optimizer state stay as they are. A resume at another layout leaves
them unused.

Under group-limited routing (``model.n_group`` > 1) an expert's number
fixes its group, so renumbering would change the routing: only a
placement with copies applies there, with the experts' numbers kept.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from coom.checkpoint.storage import latest_checkpoint, read_train_state
from coom.checkpoint.transform import Whole, transform_checkpoint
from coom.config import ModelConfig
from coom.errors import UserError
from coom.parallel.expert import PLACEMENT
from coom.parallel.placement import (
    Placement,
    identity_placement,
    local_numbering,
    plan_placement,
    renumbered,
)
from coom.train.metrics import MetricsWriter, read_metrics
from coom.train.run_dir import hold_lock

REBALANCED = "-rebalanced"
"""Suffix of the checkpoint that holds a step's renumbered experts."""
ROUTED = ("router.weight", "router.bias", "experts.w1", "experts.w3",
          "experts.w2")
"""A MoE layer's tensors whose first dimension is the routed expert."""


@dataclass
class LayerPlan:
    """One MoE layer's renumbering, new expert j is old ``order[j]``,
    and with copies its placement in the new numbers."""

    index: int
    order: list[int]
    before: float
    """Busiest rank's load over the mean, as the run places its experts
    now (``placement_in_force``)."""
    after: float
    """The same, placed."""
    placement: Optional[Placement] = None

    def fetched(self) -> int:
        """Slots whose weights their rank does not own."""
        if self.placement is None:
            return 0
        owned = self.placement.experts // self.placement.ranks
        width = self.placement.slots_per_rank
        return sum(expert // owned != slot // width for slot, expert
                   in enumerate(self.placement.slot_expert))


def measured_loads(run_dir: Path, step: int) -> dict[int, torch.Tensor]:
    """Each MoE layer's load (by block index) summed over the logged
    steps up to step and after the last rebalance or growth (either
    renumbers experts or blocks)."""
    records = [record for record in read_metrics(run_dir)
               if record["step"] <= step]
    since = max((record["step"] for record in records
                 if "rebalance" in record or "growth" in record),
                default=0)
    loads = {}
    for record in records:
        if record["step"] <= since:
            continue
        for key, value in record.items():
            if key.startswith("moe_load_layer"):
                index = int(key.removeprefix("moe_load_layer"))
                load = torch.tensor(value, dtype=torch.float64)
                loads[index] = loads.get(index, 0) + load
    return loads


def moe_prefix(config: ModelConfig, index: int) -> str:
    """State-dict prefix of block index's MoE (MTP depths follow the main
    blocks, as ``Transformer.moe_layers`` numbers them)."""
    if index < config.num_layers:
        return f"layers.{index}.mlp."
    return f"mtp.{index - config.num_layers}.block.mlp."


def placement_in_force(placed: Optional[dict], experts: int, ranks: int,
                       index: int) -> Placement:
    """The slots a resume over ranks gives layer index's experts: those of
    the checkpoint's placement (``placed``, its ``expert_placement``) if
    it was planned for as many ranks, else expert i on rank i // (experts
    / ranks)."""
    if placed and placed["ranks"] == ranks and index in placed["layers"]:
        return Placement(placed["layers"][index], ranks, experts)
    return identity_placement(experts, ranks)


def plan_layers(config: ModelConfig, loads: dict[int, torch.Tensor],
                ranks: int, redundant: int = 0,
                placed: Optional[dict] = None) -> list[LayerPlan]:
    """A renumbering per measured MoE layer that balances ranks, with a
    placement of ``redundant`` extra copies if asked for; the load before
    it is measured on the checkpoint's placement ``placed``, if any."""
    experts = config.n_routed_experts
    keep_numbers = config.n_group > 1
    if keep_numbers and not redundant:
        raise UserError(
            f"model.n_group is {config.n_group}: under group-limited "
            "routing an expert's number fixes its group, so experts "
            "cannot be renumbered; place copies with --redundant")
    if ranks < 1 or experts % ranks:
        raise UserError(f"--ranks {ranks} must divide the {experts} "
                        "routed experts")
    if not loads:
        raise UserError("metrics.jsonl holds no expert load "
                        "(moe_load_layerN) since the last rebalance; train "
                        "some steps first")
    plans = []
    for index, load in sorted(loads.items()):
        placement = plan_placement(load, ranks, redundant)
        before = placement_in_force(placed, experts, ranks,
                                    index).imbalance(load)
        if not redundant:
            plans.append(LayerPlan(index, list(placement.slot_expert),
                                   before, placement.imbalance(load)))
            continue
        order = list(range(experts)) if keep_numbers \
            else local_numbering(placement)
        plans.append(LayerPlan(index, order, before,
                               placement.imbalance(load),
                               renumbered(placement, order)))
    return plans


def renumber(tensors: dict, prefix: str, order: list[int]) -> None:
    """tensors (a state dict, or an optimizer's per-parameter state)
    with the routed experts under prefix renumbered, in place."""
    index = torch.tensor(order)
    for name in ROUTED:
        key = prefix + name
        if key not in tensors:
            continue
        value = tensors[key]
        if isinstance(value, dict):
            tensors[key] = {moment: tensor.index_select(0, index)
                            if tensor.dim() else tensor
                            for moment, tensor in value.items()}
        else:
            tensors[key] = value.index_select(0, index)


def rebalance_run(run_dir: Path, ranks: int, redundant: int = 0,
                  dry_run: bool = False) -> list[LayerPlan]:
    """Plan from run_dir's measured loads and, unless dry_run, publish
    its latest checkpoint renumbered (and with copies, placed) as the
    run's latest; holding the run's lock from the reading of its latest
    checkpoint on, so that no run trains in the directory meanwhile."""
    if dry_run:
        return _rebalance(run_dir, ranks, redundant, dry_run)
    with hold_lock(run_dir):
        return _rebalance(run_dir, ranks, redundant, dry_run)


def _rebalance(run_dir: Path, ranks: int, redundant: int,
               dry_run: bool) -> list[LayerPlan]:
    checkpoints = run_dir / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    if latest is None:
        raise UserError(f"{run_dir} has no checkpoint to rebalance")
    state = read_train_state(latest)
    config = ModelConfig(**state["config"]["model"])
    step = state["step"]
    plans = plan_layers(config, measured_loads(run_dir, step), ranks,
                        redundant, state.get(PLACEMENT))
    if dry_run:
        return plans

    def renumber_experts(whole: Whole) -> None:
        for plan in plans:
            prefix = moe_prefix(config, plan.index)
            renumber(whole.weights, prefix, plan.order)
            renumber(whole.optimizer["state"], prefix, plan.order)
        placement = None
        if redundant:
            placement = {"ranks": ranks, "layers": {
                plan.index: list(plan.placement.slot_expert)
                for plan in plans}}
        # This replaces an earlier placement, which names the experts by
        # their old numbers.
        whole.train_state[PLACEMENT] = placement
    transform_checkpoint(latest, renumber_experts, REBALANCED,
                         state["config"]["checkpoint"]["keep"])
    writer = MetricsWriter(run_dir, tensorboard=False)
    writer.write({"step": step, "rebalance": {
        "ranks": ranks, "redundant": redundant,
        "layers": {plan.index: [plan.before, plan.after]
                   for plan in plans}}})
    writer.close()
    return plans
