"""A run's step time, from a roofline of each operator of its dry run.

Each operator of a micro-batch's forward and backward on one process
(``coom.plan.costs``) takes its work at its kind's measured rate, and at
least a kernel launch (``coom.plan.ceilings``); their sum is the
micro-batch's compute. The layout then shapes the step:

- tensor parallelism splits every operator's work evenly (an ideal the
  real split only nears), and adds its all-reduces (or, with sequence
  parallelism, all-gathers and reduce-scatters of the same bytes) of
  each block's two outputs, forward and backward, on the critical path;
- pipelining gives each process its stages' share of the blocks, and
  the schedule's bubble: (m + p - 1) / m of the micro-batches' time for
  1F1B and GPipe, (m + (p - 1) / v) / m when each process holds v
  stages (the zero-bubble and V schedules too, whose bubble is smaller:
  an upper bound there);
- expert parallelism adds the all-to-alls of each MoE layer's routed
  tokens (dispatch and combine, forward and backward, and forward again
  under full recomputation);
- FSDP's gathers and reduce-scatters, and under HSDP the all-reduce of
  the gradient shards over the replicas, overlap the compute, so only
  what exceeds it shows;
- the optimizer step reads and writes each local element's master,
  gradient, moments and compute copy at copy speed.

Links: NVLink within a node of ``GPUS_PER_NODE``, else the network at
``NETWORK_BANDWIDTH`` per GPU (400 Gb/s InfiniBand). Compiled blocks
fuse element-wise work that this counts operator by operator, so for a
compiled run the memory-bound part is an upper bound.
"""
from dataclasses import dataclass

import torch

from coom.config import RunConfig
from coom.fp8.scaling import TILE
from coom.models.info import model_info
from coom.parallel.mesh import degrees
from coom.parallel.parallelize import shards
from coom.parallel.pipeline import split_layers, stages_of_process
from coom.parallel.precision import (
    compute_dtype,
    gradients_kept,
    weights_copied,
)
from coom.plan.ceilings import Ceilings
from coom.plan.dry_run import DryRun
from coom.plan.gpus import GPU
from coom.plan.memory import moe_blocks
from coom.train.optimizer import moments_dtype

GPUS_PER_NODE = 8
NETWORK_BANDWIDTH = 50e9
MASTER_BYTES = 4 + 4
"""Per element, the optimizer's read and write of the float32 master,
beside the gradient's read, the moments and any bf16 copy written."""


@dataclass(frozen=True)
class StepTime:
    """Seconds of one step, by part, and what they give."""

    parts: dict
    tokens_per_second: float
    mfu: float

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())


def micro_batch_seconds(run: DryRun, ceilings: Ceilings,
                        split: int = 1) -> dict:
    """Seconds of a micro-batch's operators by kind, each one's work
    split evenly over split processes (a launch stays a launch)."""
    seconds = {}
    for op in run.ops:
        seconds[op.kind] = seconds.get(op.kind, 0.0) + ceilings.seconds(
            op.kind, op.flops / split, op.bytes / split)
    return seconds


def _ring(count: int, size: int) -> float:
    """The share of count bytes each process sends in a ring collective
    over size processes."""
    return count * (size - 1) / size


def step_time(config: RunConfig, world_size: int, run: DryRun,
              ceilings: Ceilings, gpu: GPU, local_elements: int,
              unit_elements: int) -> StepTime:
    """config's step at world_size processes: run is its dry run;
    local_elements the parameters' elements on the busiest process, and
    unit_elements those of its FSDP units whole (0 without FSDP)."""
    parallel, train, model = config.parallel, config.train, config.model
    shape = degrees(parallel, world_size)
    data = shape["dp_replicate"] * shape["dp_shard"]
    tensor, pipeline = shape["tp"], shape["pp"]
    micro_batches = train.global_batch_size // train.micro_batch_size \
        // data
    tokens = train.micro_batch_size * config.data.seq_length
    per_micro = sum(micro_batch_seconds(run, ceilings, tensor).values())
    parts = {}
    share = 1.0
    if pipeline > 1:
        layers = split_layers(model.num_layers, parallel.pipeline_stages)
        mine = stages_of_process(parallel, 0)
        share = sum(len(layers[s]) for s in mine) / model.num_layers
        held = len(mine)
        bubble = (pipeline - 1) / held
        parts["pipeline bubble"] = per_micro * share * bubble
    parts["compute"] = per_micro * share * micro_batches
    bf16 = 2
    blocks = model.num_layers * share
    if tensor > 1:
        moved = _ring(tokens * model.hidden_size * bf16, tensor)
        parts["tensor-parallel collectives"] = (
            4 * 2 * blocks * moved * micro_batches
            / _link_bandwidth(gpu, tensor, 1))
    if parallel.expert > 1:
        # The stage with the most MoE blocks sets the pipeline's pace.
        moe = max(moe_blocks(config, rank) for rank in range(pipeline))
        parts["expert all-to-alls"] = _expert_all_to_alls(
            config, gpu, tensor, moe) * micro_batches
    shard, replicas = shape["dp_shard"], shape["dp_replicate"]
    if unit_elements and shard * replicas > 1:
        gathers = 1 if parallel.fsdp_reshard == "step" else \
            2 * micro_batches
        fsdp = _ring(unit_elements * (gathers * bf16 + 4), shard) \
            / _link_bandwidth(gpu, shard, tensor)
        # HSDP: the float32 gradient shards all-reduced over the replicas.
        fsdp += 2 * _ring(unit_elements / shard * 4, replicas) \
            / _link_bandwidth(gpu, replicas, shard * tensor)
        parts["FSDP, beyond the compute"] = max(
            0.0, fsdp - parts["compute"])
    parts["optimizer"] = local_elements * _optimizer_bytes(
        config, world_size, shape, micro_batches) / ceilings.rates["memory"]
    seconds = sum(parts.values())
    info = model_info(model, config.data.seq_length)
    throughput = train.global_batch_size * config.data.seq_length / seconds
    mfu = throughput * info.training_flops_per_token \
        / (world_size * gpu.bf16_flops)
    return StepTime(parts, throughput, mfu)


def _optimizer_bytes(config: RunConfig, world_size: int, shape: dict,
                     micro_batches: int) -> int:
    """Bytes the optimizer's step moves per element: the master's, both
    moments read and written, the gradient's read (bf16 where the
    compute copies keep it) and the compute copy's write, where
    ``ComputeWeights`` makes the copies."""
    pipelined = shape["pp"] > 1
    compute = compute_dtype(config.train.precision, torch.device("cuda"))
    copied = weights_copied(
        compute,
        shards(world_size, pipelined, shape["dp_replicate"]
               * shape["dp_shard"], shape["tp"]))
    kept = copied and gradients_kept(pipelined, micro_batches)
    moments = moments_dtype(config.optimizer.moments_dtype,
                            compute).itemsize
    return MASTER_BYTES + 4 * moments + (2 if kept else 4) \
        + (2 if copied else 0)


def _expert_all_to_alls(config: RunConfig, gpu: GPU, tensor: int,
                        moe: int) -> float:
    """Seconds of a micro-batch's expert-parallel all-to-alls on a
    process of moe MoE blocks: each one's dispatch and combine, forward
    and backward, and under full recomputation the forward's two
    again. Entries travel in bf16, forward dispatches in FP8 with
    fp8.dispatch (a byte, and a float32 scale per 128)."""
    model, expert = config.model, config.parallel.expert
    entries = config.train.micro_batch_size * config.data.seq_length \
        * model.num_experts_per_tok * model.hidden_size / tensor
    dispatched = 1 + 4 / TILE if config.fp8.dispatch else 2
    forwards = 2 if config.train.recompute == "full" else 1
    routed = entries * (forwards * (dispatched + 2) + 2 * 2)
    return moe * _ring(routed, expert) / _link_bandwidth(gpu, expert, tensor)


def _link_bandwidth(gpu: GPU, group: int, inner: int) -> float:
    """Bandwidth each process of a group of processes inner ranks apart
    has: NVLink within a node, the network across."""
    if group * inner <= GPUS_PER_NODE:
        return gpu.link_bandwidth
    return NETWORK_BANDWIDTH
