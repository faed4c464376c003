"""Wider models: hidden size, attention heads, MLA ranks, feed-forward
widths, each grown without changing what the model computes.

Every dimension of every weight is one of a few kinds, and growing it
means the same thing wherever it appears:

- a dimension a product *reads* (an input): new entries multiply inputs
  that are zero, so they are fresh random weights;
- a dimension a product *writes* into a sum that must not change (the
  residual stream, a block's output): new entries start at zero;
- heads and feed-forward units: new ones are fresh where they are
  computed and zero where they are summed into the output (``wo``'s new
  columns, ``w2``'s), so they compute but add nothing yet.

RMSNorm needs one more step, since the mean square runs over the whole
width: zero channels would shrink it. Growing a normalised width r to r'
multiplies the old channels by s = sqrt(r' / r) where they are written
(the embedding and every output projection, for the residual stream;
``wq_a`` and ``wkv_a`` for MLA's latents), which keeps the mean square
over r' channels equal to the old one over r, and divides the norm's
scale by s, so that the normalised values are the old ones exactly, and
epsilon enters as before. The new channels stay zero until trained. This
is LEMON's idea (arXiv 2310.07999) for RMSNorm, with new channels at zero
rather than copies, so that any larger width works.

A tied output head would read the scaled embedding: growing the hidden
size of such a model is refused.
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch

from coom.config import ModelConfig
from coom.errors import UserError
from coom.growth.tensors import Tensors

WIDTHS = ("hidden_size", "num_attention_heads", "q_lora_rank",
          "kv_lora_rank", "ffn_hidden_size", "moe_intermediate_size")

# What each dimension of each weight is, by its name within a block (or
# the model): kind@size, where kind is read, write (into a normalised
# sum: scaled by s, new entries zero), norm (a norm's scale over it: 1/s),
# out (summed into a block output: new entries zero) or fresh (computed
# units: new entries fresh), and size names a width; "+" joins segments.
LAYOUTS = {
    "embed.weight": ("same", "write@hidden"),
    "head.weight": ("same", "read@hidden"),
    "norm.weight": ("norm@hidden",),
    "attention_norm.weight": ("norm@hidden",),
    "mlp_norm.weight": ("norm@hidden",),
    "enorm.weight": ("norm@hidden",),
    "hnorm.weight": ("norm@hidden",),
    "eh_proj.weight": ("write@hidden", "read@hidden+read@hidden"),
    "attention.wq.weight": ("fresh@query_heads", "read@hidden"),
    "attention.wq_a.weight": ("write@q_rank", "read@hidden"),
    "attention.q_norm.weight": ("norm@q_rank",),
    "attention.wq_b.weight": ("fresh@query_heads", "read@q_rank"),
    "attention.wkv_a.weight": ("write@kv_rank+same@rope", "read@hidden"),
    "attention.kv_norm.weight": ("norm@kv_rank",),
    "attention.wkv_b.weight": ("fresh@kv_heads", "read@kv_rank"),
    "attention.wo.weight": ("write@hidden", "out@value_heads"),
    "mlp.w1.weight": ("fresh@ffn", "read@hidden"),
    "mlp.w3.weight": ("fresh@ffn", "read@hidden"),
    "mlp.w2.weight": ("write@hidden", "out@ffn"),
    "mlp.router.weight": ("same", "read@hidden"),
    "mlp.router.bias": ("same",),
    "mlp.experts.w1": ("same", "fresh@expert", "read@hidden"),
    "mlp.experts.w3": ("same", "fresh@expert", "read@hidden"),
    "mlp.experts.w2": ("same", "write@hidden", "out@expert"),
    "mlp.shared_experts.w1.weight": ("fresh@shared", "read@hidden"),
    "mlp.shared_experts.w3.weight": ("fresh@shared", "read@hidden"),
    "mlp.shared_experts.w2.weight": ("write@hidden", "out@shared"),
}


def _sizes(config: ModelConfig) -> dict[str, Optional[int]]:
    """The size of each width LAYOUTS names."""
    heads = config.num_attention_heads
    return {
        "hidden": config.hidden_size,
        "query_heads": heads * config.qk_head_dim,
        "kv_heads": heads * (config.qk_nope_head_dim + config.v_head_dim),
        "value_heads": heads * config.v_head_dim,
        "q_rank": config.q_lora_rank,
        "kv_rank": config.kv_lora_rank,
        "rope": config.qk_rope_head_dim,
        "ffn": config.ffn_hidden_size,
        "expert": config.moe_intermediate_size,
        "shared": config.n_shared_experts * config.moe_intermediate_size,
    }


@dataclass
class Axis:
    """How one dimension of a weight grows."""

    positions: torch.Tensor
    """Where each old entry sits in the new dimension."""

    scale: torch.Tensor
    """Each old entry's multiplier."""

    zero_new: bool
    """Whether the new entries must be zero (else they stay fresh)."""


def _axis(layout: str, old: dict, new: dict, length: int) -> Axis:
    """The Axis of a dimension of this layout, of old length length."""
    if layout == "same":
        return Axis(torch.arange(length), torch.ones(length), False)
    positions, scales, zero_new = [], [], False
    start = 0
    for segment in layout.split("+"):
        kind, size = segment.split("@")
        scale = (new[size] / old[size]) ** 0.5
        factor = {"write": scale, "norm": 1 / scale}.get(kind, 1.0)
        positions.append(start + torch.arange(old[size]))
        scales.append(torch.full((old[size],), factor))
        zero_new = zero_new or kind in ("write", "out")
        start += new[size]
    return Axis(torch.cat(positions), torch.cat(scales), zero_new)


def layout_key(name: str) -> str:
    """A weight's name within its block (or the model): LAYOUTS' key."""
    parts = name.split(".")
    if parts[0] == "layers":
        parts = parts[2:]
    elif parts[0] == "mtp":
        parts = parts[3:] if parts[2] == "block" else parts[2:]
    return ".".join(parts)


def widen(tensors: Tensors, name: str, old_sizes: dict,
          new_sizes: dict) -> None:
    """Place the old tensor name inside the new one (see the module
    docstring); the rest stays fresh or becomes zero."""
    old = tensors.old[name]
    layouts = LAYOUTS[layout_key(name)]
    axes = [_axis(layout, old_sizes, new_sizes, length)
            for layout, length in zip(layouts, old.shape)]
    grown = tensors.new[name].clone()
    for dim, axis in enumerate(axes):
        if axis.zero_new:
            added = torch.ones(grown.shape[dim], dtype=torch.bool)
            added[axis.positions] = False
            grown.index_fill_(dim, added.nonzero().squeeze(1), 0)
    scale = torch.ones(())
    for dim, axis in enumerate(axes):
        shape = [1] * old.dim()
        shape[dim] = -1
        scale = scale * axis.scale.view(shape)
    grown[torch.meshgrid([axis.positions for axis in axes],
                         indexing="ij")] = tensors.scaled(old, scale)
    tensors.new[name] = grown


def grown_width(before: ModelConfig, **widths: int) -> ModelConfig:
    unknown = set(widths) - set(WIDTHS)
    if unknown or not widths:
        raise UserError(f"growth operator width takes one or more of "
                        f"{', '.join(WIDTHS)}; got {', '.join(widths)}")
    for name, size in widths.items():
        current = getattr(before, name)
        if current is None:
            raise UserError(f"growth operator width: {name} is unset (full "
                            "rank) in this model; a low rank cannot grow "
                            "from it without changing the function")
        if size < current:
            raise UserError(f"growth operator width: {name} {size} is "
                            f"smaller than the model's {current}")
    if before.share_embeddings_and_output_weights \
            and widths.get("hidden_size", before.hidden_size) \
            != before.hidden_size:
        raise UserError("growth operator width: the hidden size of a model "
                        "with a tied output head cannot grow without "
                        "changing its function (the head would read the "
                        "scaled embedding)")
    return replace(before, **widths)


def carry_width(tensors: Tensors, before: ModelConfig, after: ModelConfig,
                **widths: int) -> None:
    old_sizes, new_sizes = _sizes(before), _sizes(after)
    for name in tensors.new:
        widen(tensors, name, old_sizes, new_sizes)
