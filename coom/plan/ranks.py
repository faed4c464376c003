"""A run's model as any one of its processes builds it, without the run.

The planner joins a fake process group of the run's size as the rank it
asks about (torch's ``fake`` backend, whose collectives move nothing)
and builds that process's part of the model with COOM's own
``build_model`` on the ``meta`` device: the parameters, their sharding
and FSDP's padded storage are exactly the run's, and no memory is
touched. A run whose processes differ only by their data-parallel,
tensor-parallel or expert-parallel coordinate holds the same amounts on
each: FSDP pads every shard to the same size, and the first holds the
most unpadded elements (those the optimizer's moments take); so one
process per pipeline rank, the first of each, speaks for all
(``speakers``).
"""
import contextlib
import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist

from coom.config import RunConfig
from coom.models.info import model_info
from coom.parallel.build import build_model
from coom.parallel.mesh import degrees, start_world
from coom.parallel.model import ParallelModel
from coom.parallel.parallelize import gathers_once
from coom.parallel.precision import compute_dtype


def speakers(config: RunConfig, world_size: int) -> list[int]:
    """The ranks that speak for the run: the first of each pipeline
    rank (the mesh puts the pipeline dimension outermost)."""
    pipeline = degrees(config.parallel, world_size)["pp"]
    return [stage * (world_size // pipeline) for stage in range(pipeline)]


@contextlib.contextmanager
def rank_model(config: RunConfig, world_size: int,
               rank: int) -> Iterator[ParallelModel]:
    """Process rank's part of config's model in a run of world_size
    processes, built on the meta device; the fake group is left when the
    context ends."""
    if dist.is_initialized():
        raise RuntimeError("the planner builds its models outside any "
                           "process group; plan before joining one")
    if world_size > 1:
        dist.init_process_group("fake", store=dist.HashStore(), rank=rank,
                                world_size=world_size)
    try:
        world = start_world(config.parallel, torch.device("cpu"),
                            world_size)
        model = build_model(config, world, torch.device("meta"),
                            schedule=False)
        # What a step keeps besides the parameters: the FP8 weights'
        # forms, where kept, as the step's first forwards make them.
        model.refresh_fp8_forms()
        yield model
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def as_on_gpu(config: RunConfig, gpu_memory: int) -> RunConfig:
    """config with the choices a run makes by its device made as on a
    GPU of gpu_memory bytes: bf16 compute for precision 'auto', and
    fsdp_reshard 'auto''s rule (``gathers_once``); a vocabulary left to
    the tokenizer is the size it is trained to."""
    train, parallel, model = config.train, config.parallel, config.model
    if model.vocab_size is None:
        model = dataclasses.replace(
            model, vocab_size=config.data.tokenizer_vocab_size)
    if train.precision == "auto":
        train = dataclasses.replace(train, precision="bf16")
    if parallel.fsdp_reshard == "auto":
        info = model_info(model, 1)
        total = info.total_params + info.mtp_params
        dtype = compute_dtype(train.precision, torch.device("cuda"))
        keep = gathers_once(total * dtype.itemsize, parallel, gpu_memory)
        parallel = dataclasses.replace(
            parallel, fsdp_reshard="step" if keep else "micro_batch")
    return dataclasses.replace(config, train=train, parallel=parallel,
                               model=model)
