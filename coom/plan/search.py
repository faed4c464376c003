"""``coom plan --search``: the layouts, micro-batch sizes and recompute
modes of a run that fit its GPUs, fastest first by the plan.

Layouts: pipeline, tensor (at most a node's 8 GPUs) and expert degrees
of powers of two that divide the GPUs (and the layers, heads and routed
experts), the rest data parallel; where the data-parallel processes
outnumber a node's share (8 / tensor), HSDP sharded within each node as
well as FSDP over all. For each layout and micro-batch size (1, 2, 4, 8,
splitting the global batch into as many micro-batches as a pipeline's
schedule runs), the recompute modes are tried from none to full, and the
first that fits is kept: recomputation only adds time. Dry runs are
shared by micro-batch size, recompute mode and expert degree, and each
layout's processes are built once (twice when some micro-batch sizes
accumulate gradients and others do not).
"""
import dataclasses
from dataclasses import dataclass
from typing import Iterator

from tqdm import tqdm

from coom.config import RunConfig
from coom.errors import UserError
from coom.parallel.build import check_batch_split
from coom.plan.dry_run import dry_run
from coom.plan.fit import needed
from coom.plan.gpus import GPU
from coom.plan.memory import rank_holdings
from coom.plan.plan import Plan, make_plan
from coom.plan.ranks import as_on_gpu

MODES = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8)
NODE = 8


@dataclass(frozen=True)
class Candidate:
    """A setting that fits: its config, as ``--set`` overrides of the
    searched one, and its plan."""

    config: RunConfig
    overrides: tuple[str, ...]
    plan: Plan


def _powers(limit: int, divides: int) -> list[int]:
    found, value = [], 1
    while value <= limit:
        if divides % value == 0:
            found.append(value)
        value *= 2
    return found


def layouts(config: RunConfig, world_size: int) -> Iterator[dict]:
    """The parallel sections' fields worth planning at world_size."""
    model = config.model
    for pipeline in _powers(model.num_layers, world_size):
        rest = world_size // pipeline
        for tensor in _powers(min(NODE, rest), rest):
            if model.num_attention_heads % tensor:
                continue
            # HSDP shards within a node (tensor parallelism's ranks are
            # its innermost) and replicates across nodes.
            data, in_node = rest // tensor, NODE // tensor
            replicas = [1] + ([data // in_node] if data > in_node
                              and data % in_node == 0 else [])
            for replicate in replicas:
                shard = data // replicate
                limit = min(shard, model.n_routed_experts or 1)
                for expert in _powers(limit, shard):
                    if model.n_routed_experts % expert:
                        continue
                    yield dict(pipeline=pipeline, tensor=tensor,
                               data_parallel_replicate=replicate,
                               data_parallel_shard=shard, expert=expert,
                               sequence_parallel=tensor > 1)


def _with(config: RunConfig, parallel: dict, micro_batch: int,
          recompute: str) -> RunConfig:
    return dataclasses.replace(
        config,
        parallel=dataclasses.replace(config.parallel, **parallel),
        train=dataclasses.replace(config.train,
                                  micro_batch_size=micro_batch,
                                  recompute=recompute))


def _overrides(config: RunConfig, candidate: RunConfig) -> tuple[str, ...]:
    """The ``--set`` overrides that turn config into candidate (a
    data_parallel_shard of -1 fills in the same)."""
    changed = []
    for section in ("parallel", "train"):
        before, after = getattr(config, section), getattr(candidate, section)
        for field in dataclasses.fields(after):
            old, new = (getattr(before, field.name),
                        getattr(after, field.name))
            if old != new and not (field.name == "data_parallel_shard"
                                   and old == -1):
                value = str(new).lower() if isinstance(new, bool) \
                    else str(new)
                changed.append(f"{section}.{field.name}={value}")
    return tuple(changed)


def search(config: RunConfig, world_size: int, gpu: GPU,
           show_progress: bool = True) -> list[Candidate]:
    """Every layout and micro-batch size with its cheapest recompute mode
    that fits gpu, fastest first; each is made as on the GPU
    (``as_on_gpu``), config itself as read."""
    runs, found = {}, []
    options = list(layouts(config, world_size))
    for parallel in tqdm(options, desc="layouts", disable=not show_progress):
        held = {}
        for micro_batch in MICRO_BATCHES:
            data = world_size // parallel["pipeline"] // parallel["tensor"]
            key = config.train.global_batch_size // micro_batch // data > 1
            for mode in MODES:
                try:  # the config's checks, and the batch's split
                    chosen = _with(config, parallel, micro_batch, mode)
                    candidate = as_on_gpu(chosen, gpu.memory)
                    check_batch_split(candidate, data)
                    if key not in held:
                        held[key] = rank_holdings(candidate, world_size)
                except UserError:
                    break
                shape = (micro_batch, mode, parallel["expert"])
                run = runs.get(shape)
                if run is None:
                    run = runs[shape] = dry_run(candidate)
                plan = make_plan(candidate, world_size, gpu, run, held[key])
                if needed(plan.fullest.peak) <= gpu.memory:
                    found.append(Candidate(
                        candidate, _overrides(config, chosen), plan))
                    break
    return sorted(found, key=lambda c: -c.plan.time.tokens_per_second)
