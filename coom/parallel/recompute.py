"""Activation recomputation (activation checkpointing): blocks that keep
fewer activations for the backward and recompute the rest, trading
compute for memory. Applied from outside the model with PyTorch's
non-reentrant ``torch.utils.checkpoint``, to the parts of each
transformer block (main and MTP) that hold most of its activations:
MLA attention, and the dense feed-forward or the MoE layer's experts.
The norms, the residual adds and the router stay outside: the router
counts the routed load for the expert bias, state that must change once
per forward and that ``torch.compile`` cannot trace inside a checkpoint.

How it is applied: each heavy part runs its computation through its
``recompute`` field (``coom.layers.recompute``), which this module sets
to a checkpointed call. The alternatives were worse. A wrapper module
renames every parameter under it (``attention.module.wq_a``), which
checkpoints, the optimizer's state and the interop names would see, or
needs state-dict hooks to hide it; and it hides the part's type and
attributes from the code that reads them. Replacing ``forward`` on the
instance (what this module did before) bypasses the class's own
method, so what runs is not what the code reads. With the field,
parameter names and module types are unchanged, the class's forward
runs, and the parts' hooks (tensor parallelism's) stay outside the
checkpoint as before.

- ``full``: a part keeps only its input; its whole forward runs again in
  the backward (Megatron: recompute_granularity=full, torchtitan:
  activation_checkpoint.mode=full). An MoE layer's part is its routed
  path (``MoE.routed``): the token copies, the experts (routed and
  shared) and the weighted combine, so it keeps the tokens once, not a
  copy per routed expert twice over. Under expert parallelism the
  recomputation repeats the dispatch and combine all-to-alls, as
  Megatron's and torchtitan's full recomputation do; at DeepSeek-V3's
  shape that is what lets a stage of 1F1B's 16 micro-batches in flight
  fit (``docs/plan.md``).
- ``selective``: a part keeps the outputs of its matrix products,
  attention and collectives, and recomputes the cheap element-wise work
  around them (rotary embedding, the latent norms, SwiGLU's gating), as
  torchtitan's per-op selective mode does. An MoE layer's parts are its
  routed and its shared experts; under expert parallelism
  ``ExpertParallel`` (``coom.parallel.expert``) calls the replaced
  experts' ``run`` for its own slots, so their checkpoint holds their
  products only, never the all-to-alls around them.

What a block computes is unchanged, so losses, gradients and routed
loads are those of a run without recomputation.
"""
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from coom.fp8 import ops as fp8_ops
from coom.layers.moe import MoE

GRANULARITIES = ("none", "selective", "full")


def _saved_ops() -> set:
    """The ops whose outputs selective recomputation keeps."""
    aten = torch.ops.aten
    functional = torch.ops._c10d_functional
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default,
           aten._scaled_mm.default, aten._grouped_mm.default,
           aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default,
           functional.all_to_all_single.default,
           functional.reduce_scatter_tensor.default,
           functional.all_reduce.default}
    return ops | {op._opoverload for op in (
        fp8_ops.scaled_mm, fp8_ops.grouped_mm, fp8_ops.grouped_mm_wgrad)}


def _policy(saved: set, context, op, *args, **kwargs) -> CheckpointPolicy:
    if op in saved:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _recomputed(granularity: str):
    """A part's ``recompute``: its computation, run under checkpoint when
    gradients are being recorded (not in evaluation or decoding, where
    nothing is kept anyway)."""
    options = {"use_reentrant": False}
    if granularity == "selective":
        options["context_fn"] = partial(create_selective_checkpoint_contexts,
                                        partial(_policy, _saved_ops()))

    def recompute(compute, *args):
        if not torch.is_grad_enabled():
            return compute(*args)
        return checkpoint(compute, *args, **options)
    return recompute


def _heavy_parts(block: nn.Module, granularity: str) -> list[nn.Module]:
    """A block's attention, and its dense feed-forward or its MoE's
    experts: under full recomputation their whole routed path, else the
    routed and the shared experts each."""
    if isinstance(block.mlp, MoE) and granularity == "selective":
        experts = [block.mlp.experts, block.mlp.shared_experts]
        return [block.attention, *filter(None, experts)]
    return [block.attention, block.mlp]


def recompute_blocks(model: nn.Module, granularity: str) -> None:
    """Recompute the heavy parts of each of model's blocks
    (``model.blocks()``) in the backward at granularity none (nothing
    changes), selective or full; in place. Parameter names are unchanged
    (no wrapper module)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown recompute granularity {granularity!r}; "
                         f"expected one of {', '.join(GRANULARITIES)}")
    if granularity == "none":
        return
    recompute = _recomputed(granularity)
    for block in model.blocks():
        for part in _heavy_parts(block, granularity):
            part.recompute = recompute
