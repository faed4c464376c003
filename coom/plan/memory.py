"""The memory plan of a run: what each process holds at its peak.

Two parts, each read off COOM's own model:

- what a process holds for the whole step (``coom.plan.states``), from
  its part of the model built as that rank of the run;
- what a micro-batch's forward and backward add at their peak
  (``coom.plan.dry_run``), counted on one process's whole model (the
  data-parallel processes of FSDP and HSDP compute exactly that), its
  routed experts cut to the process's share under expert parallelism,
  and divided among the layout's splits: under pipelining, a stage's share
  of the blocks times the micro-batches its schedule keeps in flight;
  under sequence-parallel tensor parallelism, a tensor-parallel
  process's share of the tokens. These two are proportions, not counts:
  the plan says so where it uses them.

FSDP adds its buffers: while it reshards after each forward and
backward, the unit being gathered and the one it prefetches, and in the
backward a unit's gradients in the compute dtype plus their float32
copy for the reduce-scatter; the largest unit stands for each.

A process of one whose step is one micro-batch starts its backward
without gradients, which come as activations go: its backward's peak is
the dry run's that makes them, in place of the gradients' term.
"""
from dataclasses import dataclass
from typing import Optional

from coom.config import RunConfig
from coom.parallel.mesh import local_tensor
from coom.parallel.model import ParallelModel
from coom.parallel.pipeline import split_layers, stages_of_process
from coom.plan.dry_run import (
    DryRun,
    RoutedCopy,
    dry_run,
    routed_copy_bytes,
)
from coom.plan.ranks import rank_model, speakers
from coom.plan.states import MASTER, Term, fsdp_groups, state_terms


@dataclass(frozen=True)
class RankMemory:
    """The peak memory of one process of a run, by term."""

    rank: int
    pipeline_rank: int
    terms: list[Term]
    local_elements: int
    """Of its parameters, unpadded."""

    unit_elements: int
    """Of its FSDP units' parameters whole (0 without FSDP)."""

    worst_routing: int = 0
    """Bytes beyond the peak under the worst routing (``worst_routing``).
    """

    @property
    def peak(self) -> int:
        return sum(term.bytes for term in self.terms)

    def largest(self) -> Term:
        return max(self.terms, key=lambda term: term.bytes)


def in_flight(config: RunConfig, pipeline_rank: int,
              micro_batches: int) -> float:
    """Stage-micro-batches of activations a pipeline process holds at
    most under its schedule (1 without pipelining)."""
    parallel = config.parallel
    size, schedule = parallel.pipeline, parallel.pipeline_schedule
    if size == 1:
        return 1
    stages = len(stages_of_process(parallel, pipeline_rank))
    behind = size - pipeline_rank
    if schedule in ("GPipe", "LoopedBFS"):
        return micro_batches * stages
    if schedule == "1F1B":
        return min(micro_batches, behind)
    if schedule in ("ZBVZeroBubble", "DualPipeV"):
        return min(2 * micro_batches, size + 1)
    return min(micro_batches * stages,
               2 * (behind - 1) + (stages - 1) * size + 1)


def _in_flight_share(config: RunConfig, pipeline_rank: int,
                     micro_batches: int) -> tuple[float, list[str]]:
    """The multiple of one process's whole-model micro-batch that the
    rank's micro-batches in flight hold, and how it was made."""
    parallel = config.parallel
    notes, share = [], 1.0
    if parallel.pipeline > 1:
        layers = split_layers(config.model.num_layers,
                              parallel.pipeline_stages)
        mine = stages_of_process(parallel, pipeline_rank)
        blocks = sum(len(layers[s]) for s in mine) / len(mine)
        flight = in_flight(config, pipeline_rank, micro_batches)
        share = blocks / config.model.num_layers * flight
        notes.append(f"x {blocks:g}/{config.model.num_layers} blocks x "
                     f"{flight:g} in flight ({parallel.pipeline_schedule})")
    if parallel.tensor > 1 and parallel.sequence_parallel:
        share /= parallel.tensor
        notes.append(f"/ {parallel.tensor} (sequence parallel)")
    return share, notes


def activation_terms(config: RunConfig, one: DryRun, pipeline_rank: int,
                     micro_batches: int) -> list[Term]:
    """What the rank's micro-batches in flight save for their backwards,
    and what a backward adds at its peak, from one, a micro-batch's on
    one process (``coom.plan.dry_run``)."""
    train = config.train
    share, notes = _in_flight_share(config, pipeline_rank, micro_batches)
    notes.insert(0, f"{train.micro_batch_size} x {config.data.seq_length} "
                 f"tokens, recompute {train.recompute}")
    return [Term("activations", round(one.saved * share),
                 " ".join(notes)),
            Term("backward transients", one.peak - one.saved,
                 "a backward's peak over what its forward saved, on one "
                 "process (less under tensor or expert parallelism)")]


def fullest(plans: list[RankMemory]) -> RankMemory:
    """The process of plans whose memory peaks highest."""
    return max(plans, key=lambda plan: plan.peak)


def moe_blocks(config: RunConfig, pipeline_rank: int) -> int:
    """The MoE blocks of the process at pipeline_rank, over all its
    stages: its main blocks', and the MTP depths' on the last stage."""
    model, parallel = config.model, config.parallel
    stages = parallel.pipeline_stages if parallel.pipeline > 1 else 1
    layers = split_layers(model.num_layers, stages)
    mine = stages_of_process(parallel, pipeline_rank) \
        if parallel.pipeline > 1 else [0]
    blocks = [index for stage in mine for index in layers[stage]]
    if stages - 1 in mine:
        blocks += range(model.num_layers,
                        model.num_layers + model.mtp_num_layers)
    return sum(model.is_moe_layer(index) for index in blocks)


def worst_routing(config: RunConfig, copy: RoutedCopy, pipeline_rank: int,
                  micro_batches: int) -> int:
    """What the rank would hold beyond a balanced routing's if every
    process of its expert-parallel group sent each token's copies to
    this process's experts, as many as it holds (0 without expert
    parallelism): what its MoE blocks keep, and what one block's
    forward holds while it runs (more in its backward); copy from
    ``routed_copy_bytes``."""
    model, expert = config.model, config.parallel.expert
    if expert == 1:
        return 0
    tokens = config.train.micro_batch_size * config.data.seq_length
    top = model.num_experts_per_tok
    worst = expert * min(top, model.n_routed_experts // expert)
    stages = len(stages_of_process(config.parallel, pipeline_rank)) \
        if config.parallel.pipeline > 1 else 1
    # in_flight counts stage-micro-batches: a stage's blocks each.
    kept = moe_blocks(config, pipeline_rank) / stages \
        * in_flight(config, pipeline_rank, micro_batches)
    return round((worst - top) * tokens * (copy.kept * kept + copy.passing))


def _gradients_as_made(terms: list[Term], one: DryRun) -> list[Term]:
    """terms of a process of one whose step is one micro-batch: its
    gradients do not wait from an earlier micro-batch but come as the
    backward frees its activations, so the backward's peak is the dry
    run's with the gradients made."""
    kept = [term for term in terms
            if term.name not in ("gradients", "backward transients")]
    return kept + [Term("backward transients", one.fresh_peak - one.saved,
                        "a backward's peak over what its forward saved, "
                        "the gradients made as it goes included")]


def fsdp_buffers(model: ParallelModel) -> Optional[Term]:
    """FSDP's gathering and reducing buffers at their peak, or None
    without FSDP."""
    groups = fsdp_groups(model)
    if not groups:
        return None
    largest = max(sum(param._orig_size.numel()
                      for param in group.fsdp_params) for group in groups)
    compute = model.dtype.itemsize
    gathered = 0 if model.keep_gathered else 2 * largest * compute
    return Term("FSDP buffers", gathered + largest * (compute + MASTER),
                "the largest unit's: gathered and prefetched, its "
                "gradients and their float32 reduce-scatter input")


@dataclass(frozen=True)
class Holdings:
    """What a process holds for the whole step, and FSDP's buffers: all
    that its build decides (``rank_holdings``)."""

    rank: int
    pipeline_rank: int
    data_size: int
    terms: list[Term]
    local_elements: int
    unit_elements: int


def rank_holdings(config: RunConfig, world_size: int) -> list[Holdings]:
    """The holdings of each process that speaks for the run."""
    train = config.train
    found = []
    for rank in speakers(config, world_size):
        with rank_model(config, world_size, rank) as model:
            data = model.world.data_size
            micro_batches = train.global_batch_size \
                // train.micro_batch_size // data
            terms = state_terms(model, micro_batches,
                                config.optimizer.moments_dtype)
            buffers = fsdp_buffers(model)
            if buffers is not None:
                terms.append(buffers)
            found.append(Holdings(
                rank, model.world.pipeline_rank, data, terms,
                sum(local_tensor(p).numel()
                    for p in model.model.parameters()),
                sum(param._orig_size.numel()
                    for group in fsdp_groups(model)
                    for param in group.fsdp_params)))
    return found


def memory_plan(config: RunConfig, world_size: int,
                one: Optional[DryRun] = None,
                holdings: Optional[list[Holdings]] = None
                ) -> list[RankMemory]:
    """The peak memory of each process that speaks for the run
    (``speakers``), from config's dry run and holdings (made here unless
    given): config must already be as on the GPU (``as_on_gpu``)."""
    train = config.train
    one = one or dry_run(config)
    copy = routed_copy_bytes(config) if config.parallel.expert > 1 \
        else RoutedCopy(0.0, 0.0)
    plans = []
    for held in holdings or rank_holdings(config, world_size):
        micro_batches = train.global_batch_size \
            // train.micro_batch_size // held.data_size
        terms = held.terms + activation_terms(
            config, one, held.pipeline_rank, micro_batches)
        if world_size == 1 and micro_batches == 1:
            terms = _gradients_as_made(terms, one)
        plans.append(RankMemory(
            held.rank, held.pipeline_rank, terms, held.local_elements,
            held.unit_elements, worst_routing(
                config, copy, held.pipeline_rank, micro_batches)))
    return plans
