"""A micro-batch's forward and backward run on the meta device, with the
bytes it allocates counted: activations, the tensors autograd saves and
every transient of both passes, as the model's own modules make them.

``LiveBytes`` sees each operator's outputs (a ``TorchDispatchMode``) and
keeps a weak reference to each new storage, so a storage counts from its
operator to its last use, as an allocator sees it; its peak is the most
bytes alive at once. On the meta device the model takes the paths it
takes on a GPU: the fused kernels' ops (whose fake implementations
allocate what the kernels do), cuDNN's attention and the grouped matrix
product. What autocast would do there, meta cannot: products of float32
activations are then counted in float32 (the compute copies are bf16, so
few are).
"""
import dataclasses
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from coom.config import ModelConfig, RunConfig
from coom.errors import UserError
from coom.layers.moe import MoE
from coom.parallel.objective import training_objective
from coom.plan.costs import OpCost, OpCosts
from coom.plan.ranks import rank_model


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages made under it and still alive: now, and at
    most (``peak``)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, weakref.ref] = {}
        self.peak = 0

    def now(self) -> int:
        # Storages may change size after their operator (FSDP resizes
        # them), so each is asked again.
        return sum(storage.nbytes() for storage in
                   (ref() for ref in list(self.storages.values()))
                   if storage is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(ret.alias_info is not None for ret in func._schema.returns):
            # Views and in-place results: storage made elsewhere.
            return out
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = id(storage)
                if key not in self.storages:
                    self.storages[key] = weakref.ref(
                        storage, lambda _, key=key: self.storages.pop(key))
        self.peak = max(self.peak, self.now())
        return out


ONE_PROCESS = {"pipeline": 1, "data_parallel_replicate": 1,
               "data_parallel_shard": 1, "tensor": 1, "expert": 1,
               "sequence_parallel": False}


@dataclass(frozen=True)
class DryRun:
    """A micro-batch's forward and backward on one process: the bytes it
    holds over the step's holdings at the forward's end (what is saved
    for the backward) and at most, once with the gradients there already
    (``peak``, as when micro-batches accumulate) and once with the
    backward making them (``fresh_peak``, a step's only micro-batch);
    and its operators' costs."""

    saved: int
    peak: int
    fresh_peak: int
    ops: list[OpCost]


def _alone(config: RunConfig) -> RunConfig:
    """config on one process, its blocks eager (meta cannot run
    inductor's code)."""
    return dataclasses.replace(
        config, parallel=dataclasses.replace(config.parallel, **ONE_PROCESS),
        train=dataclasses.replace(config.train, compile=False))


def _micro_batch(model, batch: int, length: int,
                 backward: bool = True) -> tuple:
    """(saved, peak, costs) of one forward (and backward) of model."""
    tokens = torch.zeros(batch, length, dtype=torch.long, device="meta")
    live, costs = LiveBytes(), OpCosts()
    with model.compute(), live, costs:
        losses_k = model.model(
            tokens, labels_bs=tokens,
            loss_mask_bs=torch.ones(batch, length, device="meta"),
            loss_tokens=batch * length)
        objective, _ = training_objective(losses_k, 0.3, 1)
        saved = live.now()
        if backward:
            objective.backward()
    return saved, live.peak, costs.ops


def _one_process(config: RunConfig) -> DryRun:
    batch, length = config.train.micro_batch_size, config.data.seq_length
    with rank_model(_alone(config), 1, 0) as model:
        _, fresh_peak, _ = _micro_batch(model, batch, length)
        saved, peak, ops = _micro_batch(model, batch, length)
    return DryRun(saved, peak, fresh_peak, ops)


def _routable(model: ModelConfig, experts: int) -> bool:
    """Whether model's routing can run over this many experts (the
    config's own checks say)."""
    try:
        dataclasses.replace(model, n_routed_experts=experts)
    except UserError:
        return False
    return True


def _with_experts(config: RunConfig, experts: int) -> RunConfig:
    return dataclasses.replace(config, model=dataclasses.replace(
        config.model, n_routed_experts=experts))


def dry_run(config: RunConfig) -> DryRun:
    """One micro-batch of config's model on one process (which every
    process of FSDP and HSDP computes as), on the meta device, twice:
    first without gradients, then adding to those the first made. Its
    blocks run eagerly, compiled or not: meta cannot run inductor's code.
    (Compiled as inductor partitions them but run eagerly, by the
    ``aot_eager_decomp_partition`` backend, the bf16 blocks of ``small``
    saved exactly what eager ones save.)

    Under expert parallelism the process holds its share of the routed
    experts, which meta cannot build; the dry run holds that many
    experts instead, or, where the routing needs more (top-8 of 4
    experts), the two fewest it can run over, and follows the line
    through them down to the share: what grows with the experts (the
    FP8 copies of their weights, their weight gradients) grows in
    proportion. Either way the router scores that many experts, not all
    of them: a few MiB too few per MoE block. The operators' costs are
    the fewer count's: its per-expert work (weight casts, FP8 weight
    quantisation, weight gradients' writes) is over-counted where that
    count exceeds the share."""
    model, share = config.model, config.parallel.expert
    if share == 1:
        return _one_process(config)
    local, alone = model.n_routed_experts // share, _alone(config)
    counts = [count for count in range(local, model.n_routed_experts + 1)
              if _routable(model, count)][:2]
    if counts[0] == local or len(counts) == 1:
        return _one_process(_with_experts(alone, counts[0]))
    (fewer, more) = (_one_process(_with_experts(alone, count))
                     for count in counts)
    below = (counts[0] - local) / (counts[1] - counts[0])

    def line(name: str) -> int:
        at_fewer = getattr(fewer, name)
        return round(at_fewer - (getattr(more, name) - at_fewer) * below)
    return DryRun(line("saved"), line("peak"), line("fresh_peak"),
                  fewer.ops)


class RoutedCopy(NamedTuple):
    """Bytes one more routed copy of a token takes: kept for the
    backward in each MoE block, and passing, live only while a block's
    forward runs (at the forward's peak, beyond what it keeps)."""

    kept: float
    passing: float


def _moe_block(model, batch: int, length: int) -> tuple[int, int]:
    """(saved, peak) of the forward of model's first MoE block alone."""
    transformer = model.model
    block = next(block for block in transformer.blocks()
                 if isinstance(block.mlp, MoE))
    live = LiveBytes()
    with model.compute():
        x_bsd = torch.zeros(batch, length, transformer.config.hidden_size,
                            dtype=transformer.embed.weight.dtype,
                            device="meta", requires_grad=True)
        with live:
            out_bsd = block(x_bsd, transformer.rope)
            saved = live.now()  # with out_bsd, whose graph keeps them
    del out_bsd
    return saved, live.peak


def routed_copy_bytes(config: RunConfig) -> RoutedCopy:
    """What one more routed copy of a token takes, from the forwards of
    an MoE block of config's model with its experts per token and one
    more (0 for a dense model)."""
    model = config.model
    if not any(model.is_moe_layer(index) for index in
               range(model.num_layers + model.mtp_num_layers)):
        return RoutedCopy(0.0, 0.0)
    batch, length = config.train.micro_batch_size, config.data.seq_length
    runs = []
    for extra in (0, 1):
        wider = dataclasses.replace(config, model=dataclasses.replace(
            model, num_experts_per_tok=model.num_experts_per_tok + extra))
        with rank_model(_alone(wider), 1, 0) as built:
            runs.append(_moe_block(built, batch, length))
    (saved, peak), (wider_saved, wider_peak) = runs
    kept, tokens = wider_saved - saved, batch * length
    return RoutedCopy(kept / tokens,
                      max(0, wider_peak - wider_saved - peak + saved)
                      / tokens)
