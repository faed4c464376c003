"""The one place that turns a run's config into the model it trains.

The order matters, and is kept here alone: the model is built on the
``meta`` device and materialised on this process's device (every process
draws the same initial weights from the seed set before), its linears
and experts are swapped for FP8 ones, its heavy parts recomputed in the
backward and its blocks compiled; pipeline parallelism then keeps this
process's stages, and ``parallelize`` applies tensor, sequence and
expert parallelism and FSDP before the pipeline's schedule is built.
Last, the MoE layers learn their auxiliary losses' weight per
micro-batch and the balancer that moves their expert biases.
"""
import torch

from coom.config import RunConfig
from coom.errors import UserError
from coom.fp8.convert import convert_to_fp8
from coom.models import Transformer
from coom.parallel.balance import ExpertBalancer
from coom.parallel.mesh import World
from coom.parallel.model import ParallelModel
from coom.parallel.parallelize import keeps_gathered, parallelize, sharded
from coom.parallel.pipeline import Pipeline, check_micro_batches
from coom.parallel.precision import (
    ComputeWeights,
    compute_dtype,
    gradients_kept,
    weights_copied,
)
from coom.parallel.recompute import recompute_blocks


def check_batch_split(config: RunConfig, data_size: int) -> None:
    """Each data-parallel process needs whole micro-batches, and as many
    as the pipeline's schedule runs."""
    train = config.train
    share = train.micro_batch_size * data_size
    if train.global_batch_size % share:
        smaller = [size for size in range(train.micro_batch_size - 1, 0, -1)
                   if train.global_batch_size % (size * data_size) == 0]
        raise UserError(
            f"config field train.global_batch_size: "
            f"{train.global_batch_size} does not split into "
            f"{data_size} data-parallel processes x micro_batch_size "
            f"{train.micro_batch_size}; make it a multiple of {share}"
            + (f", or set train.micro_batch_size={smaller[0]}"
               if smaller else ""))
    check_micro_batches(config.parallel, train.global_batch_size // share)


def build_model(config: RunConfig, world: World, device: torch.device,
                schedule: bool = True) -> ParallelModel:
    """config's model, as this process runs it in world's layout; without
    schedule, a pipeline's schedule is left unbuilt (it holds no memory,
    and takes a planner seconds to build at 671B)."""
    train = config.train
    check_batch_split(config, world.data_size)
    with torch.device("meta"):
        model = Transformer(config.model, fused_kernels=train.kernels)
    model.to_empty(device=device)
    model.init_weights()
    fp8_choices = convert_to_fp8(
        model, config.fp8, train.micro_batch_size * config.data.seq_length,
        world.expert_size)
    recompute_blocks(model, train.recompute)
    if train.compile:
        model.compile_blocks()
    micro_batches = train.global_batch_size // train.micro_batch_size
    dtype = compute_dtype(train.precision, device)
    pipeline = None
    if world.pipeline_size > 1:
        pipeline = Pipeline(model, world, config.parallel,
                            micro_batches // world.data_size,
                            (train.micro_batch_size, config.data.seq_length),
                            dtype)
    keep_gathered = keeps_gathered(model, config.parallel, dtype)
    parallelize(model, world, config.parallel, dtype,
                pipeline and pipeline.stages, keep_gathered)
    # Under FSDP its policy makes the compute weights; otherwise they
    # are copies swapped in for each step.
    weights = None
    if weights_copied(dtype, sharded(world, pipeline is not None)):
        weights = ComputeWeights(model, dtype, gradients_kept(
            pipeline is not None, micro_batches // world.data_size))
    if pipeline is not None and schedule:
        pipeline.build_schedule()
    layers = model.moe_layers()
    for moe in layers.values():
        # As if each micro-batch's auxiliary losses, over the step's
        # micro-batches, were added to the objective, which FSDP's
        # average over the data-parallel processes divides.
        moe.aux_loss_scale = world.data_size / micro_batches
    return ParallelModel(
        model, world, pipeline,
        ExpertBalancer(layers, world, micro_batches), device, dtype,
        weights, keep_gathered, config.parallel.sequence_parallel,
        keep_fp8_forms=micro_batches // world.data_size > 1,
        fp8_choices=fp8_choices)
