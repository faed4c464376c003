"""Deeper models: more transformer blocks, more MTP depths.

``depth`` adds blocks to the MoE part of the stack (after the
``first_k_dense_replace`` dense blocks, which stay a prefix):

- ``identity`` (the default) spreads new blocks evenly through it. A new
  block is freshly initialised but for its two output projections
  (attention ``wo``, and the feed-forward's ``w2``: dense, routed and
  shared experts), which start at zero. In the pre-norm residual stream
  such a block adds nothing, so the model computes what it did, and the
  zeros receive gradients from the first step.
- ``stack`` repeats the MoE part's blocks in order (G_stack, arXiv
  2405.15319: [1 2 3] becomes [1 2 3 1 2 3]), optimizer moments included.
  It does not keep the function; it keeps what the blocks learned.

``mtp`` adds Multi-Token Prediction depths after the existing ones. The
main model and the existing depths are untouched, so their logits are
too; each new depth starts as a copy of the last one (fresh weights when
there was none).
"""
from dataclasses import replace
from typing import Optional

import torch

from coom.config import ModelConfig
from coom.errors import UserError
from coom.growth.tensors import Tensors

OUTPUT_PROJECTIONS = ("attention.wo.weight", "mlp.w2.weight",
                      "mlp.experts.w2", "mlp.shared_experts.w2.weight")
"""Within a block, the weights whose zeros make the block an identity."""


def _moe_part_start(config: ModelConfig) -> int:
    """The first block that may be repeated or have blocks put after it."""
    if not config.n_routed_experts:
        return 0
    return min(config.first_k_dense_replace, config.num_layers)


def block_sources(before: ModelConfig, num_layers: int,
                  method: str) -> list[Optional[int]]:
    """For each block of the grown model, the block it is copied from;
    None for a new identity block."""
    start = _moe_part_start(before)
    part = list(range(start, before.num_layers))
    added = num_layers - before.num_layers
    sources: list[Optional[int]] = list(range(start))
    if method == "stack":
        return sources + [part[i % len(part)]
                          for i in range(len(part) + added)]
    # New block j follows the part's block (j + 1) * len / added - 1.
    after = [(j + 1) * len(part) // added - 1 for j in range(added)]
    sources += [None] * after.count(-1)
    for position, block in enumerate(part):
        sources += [block] + [None] * after.count(position)
    return sources


def grown_depth(before: ModelConfig, *, num_layers: int,
                method: str = "identity") -> ModelConfig:
    if method not in ("identity", "stack"):
        raise UserError(f"growth operator depth: method must be identity "
                        f"or stack, got {method!r}")
    if num_layers <= before.num_layers:
        raise UserError(f"growth operator depth: num_layers {num_layers} "
                        f"must exceed the model's {before.num_layers}")
    if method == "stack" and _moe_part_start(before) == before.num_layers:
        raise UserError("growth operator depth: method stack repeats the "
                        "MoE blocks, and this model has none (all "
                        f"{before.num_layers} are dense prefix blocks)")
    return replace(before, num_layers=num_layers)


def carry_depth(tensors: Tensors, before: ModelConfig, after: ModelConfig,
                *, num_layers: int, method: str = "identity") -> None:
    for name in tensors.new:
        if not name.startswith("layers."):
            tensors.new[name] = tensors.old[name]
    sources = block_sources(before, num_layers, method)
    for index, source in enumerate(sources):
        target = f"layers.{index}"
        if source is not None:
            tensors.copy_prefix(f"layers.{source}", target)
            continue
        for output in OUTPUT_PROJECTIONS:
            name = f"{target}.{output}"
            if name in tensors.new:
                tensors.new[name] = torch.zeros_like(tensors.new[name])


def grown_mtp(before: ModelConfig, *, depths: int) -> ModelConfig:
    if depths <= before.mtp_num_layers:
        raise UserError(f"growth operator mtp: depths {depths} must exceed "
                        f"the model's {before.mtp_num_layers}")
    return replace(before, mtp_num_layers=depths)


def carry_mtp(tensors: Tensors, before: ModelConfig, after: ModelConfig,
              *, depths: int) -> None:
    kept = before.mtp_num_layers
    for name in tensors.new:
        if name in tensors.old:
            tensors.new[name] = tensors.old[name]
    if not kept:
        return
    last = f"mtp.{kept - 1}."
    last_names = {name[len(last):] for name in tensors.old
                  if name.startswith(last)}
    for depth in range(kept, depths):
        prefix = f"mtp.{depth}."
        names = {name[len(prefix):] for name in tensors.new
                 if name.startswith(prefix)}
        # A depth past first_k_dense_replace's boundary has another kind
        # of feed-forward than the last one, and stays fresh.
        if names == last_names:
            tensors.copy_prefix(f"mtp.{kept - 1}", f"mtp.{depth}")
