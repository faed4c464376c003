"""More experts: new routed experts, finer experts, dense blocks made MoE.

``add_experts`` appends routed experts (to each expert group alike). A
new expert is fresh and starts unselected: its bias is one below the
lowest expert bias, and sigmoid affinities lie in (0, 1), so it scores
below every old expert for every token. Auxiliary-loss-free balancing
then raises its bias by ``moe_router_bias_update_rate`` for every step it
is idle (it has no load), so it joins after about
(1 + bias spread) / rate steps. Softmax routing is refused: new experts
would change every affinity.

``split_experts`` cuts each routed expert into ``segments`` finer ones
(DeepSeekMoE's fine-grained segmentation): each takes 1/segments of the
expert's units and the expert's router row and bias, and every token
picks segments times as many. The segments of one expert tie, so a token
picks all of them or none, and their outputs sum to the expert's. The
normalised combine weights are then segments times smaller, which
``routed_scaling_factor`` makes up for. Under softmax routing each
segment's affinity is the expert's over segments, and so is its bias.

``upcycle`` turns dense blocks into MoE blocks that compute the same
function: the dense SwiGLU's units are cut into moe_intermediate_size
wide segments; the first ``n_shared_experts`` of them become the shared
experts, and the others are copied into replicas, each replica one
set of routed experts that share a fresh router row (so they tie, as
above). A token picks whole replicas; with normalised weights and
``routed_scaling_factor`` equal to the segments per replica, their sum is
the dense block's output. Group-limited routing is refused by all three
where it would change the choice (groups rank by their top-2 scores, and
tied segments would fill both).
"""
from dataclasses import replace
from typing import Optional

import torch

from coom.config import ModelConfig
from coom.errors import UserError
from coom.growth.tensors import Tensors

ROUTED = ("mlp.router.weight", "mlp.router.bias", "mlp.experts.w1",
          "mlp.experts.w3", "mlp.experts.w2")
"""The weights with one row (dim 0) per routed expert."""


def _moe_prefixes(tensors: Tensors) -> list[str]:
    """The blocks (main and MTP) that hold an MoE feed-forward, before."""
    return [name.removesuffix(".mlp.router.weight") for name in tensors.old
            if name.endswith(".mlp.router.weight")]


def _copy_except(tensors: Tensors, changed: list[str]) -> None:
    """Copy every weight but those whose names start with changed's."""
    for name in tensors.new:
        if not name.startswith(tuple(changed)):
            tensors.new[name] = tensors.old[name]


def _routed(prefixes: list[str]) -> list[str]:
    return [f"{prefix}.{suffix}" for prefix in prefixes
            for suffix in ROUTED]


def _refuse(operator: str, problem: str) -> UserError:
    return UserError(f"growth operator {operator}: {problem}")


def _require_moe(before: ModelConfig, operator: str) -> None:
    if not before.n_routed_experts:
        raise _refuse(operator, "the model has no routed experts; use "
                      "upcycle to make dense blocks MoE")
    if before.n_group > 1 and operator != "add_experts":
        raise _refuse(operator, "group-limited routing (n_group > 1) "
                      "ranks groups by their top-2 scores, which tied "
                      "segments would change")


def grown_add_experts(before: ModelConfig, *,
                      n_routed_experts: int) -> ModelConfig:
    _require_moe(before, "add_experts")
    added = n_routed_experts - before.n_routed_experts
    if added <= 0:
        raise _refuse("add_experts", f"n_routed_experts {n_routed_experts} "
                      f"must exceed the model's {before.n_routed_experts}")
    if added % before.n_group:
        raise _refuse("add_experts", f"{added} new experts do not split "
                      f"over the {before.n_group} expert groups")
    if before.scoring_func != "sigmoid":
        raise _refuse("add_experts", "softmax routing would give new "
                      "experts a share of every token's affinity; use "
                      "split_experts")
    return replace(before, n_routed_experts=n_routed_experts)


def carry_add_experts(tensors: Tensors, before: ModelConfig,
                      after: ModelConfig, *, n_routed_experts: int) -> None:
    prefixes = _moe_prefixes(tensors)
    _copy_except(tensors, _routed(prefixes))
    old_group = before.n_routed_experts // before.n_group
    new_group = n_routed_experts // before.n_group
    old_experts = torch.arange(before.n_routed_experts)
    positions = old_experts // old_group * new_group + old_experts % old_group
    for name in _routed(prefixes):
        grown = tensors.new[name].clone()
        if name.endswith("mlp.router.bias"):
            grown.fill_(tensors.old[name].min() - 1)
        grown[positions] = tensors.old[name]
        tensors.new[name] = grown


def _scaling_for_segments(config: ModelConfig) -> bool:
    """Whether cutting experts into segments shrinks their combine
    weights (normalised weights, or softmax affinities, are shared out
    among the segments)."""
    return config.norm_topk_prob or config.scoring_func == "softmax"


def grown_split_experts(before: ModelConfig, *,
                        segments: int) -> ModelConfig:
    _require_moe(before, "split_experts")
    width = before.moe_intermediate_size
    if segments < 2 or width % segments:
        raise _refuse("split_experts", f"segments must be 2 or more and "
                      f"divide moe_intermediate_size {width}; got "
                      f"{segments}")
    factor = segments if _scaling_for_segments(before) else 1
    return replace(
        before, n_routed_experts=before.n_routed_experts * segments,
        num_experts_per_tok=before.num_experts_per_tok * segments,
        moe_intermediate_size=width // segments,
        n_shared_experts=before.n_shared_experts * segments,
        routed_scaling_factor=before.routed_scaling_factor * factor)


def carry_split_experts(tensors: Tensors, before: ModelConfig,
                        after: ModelConfig, *, segments: int) -> None:
    prefixes = _moe_prefixes(tensors)
    _copy_except(tensors, _routed(prefixes))
    # Softmax shares each affinity out among the segments; so must the
    # bias, for the choice to stay the same.
    bias_scale = 1 / segments if before.scoring_func == "softmax" else 1
    for prefix in prefixes:
        old = {suffix: tensors.old[f"{prefix}.{suffix}"]
               for suffix in ROUTED}
        new = {
            "mlp.router.weight":
                old["mlp.router.weight"].repeat_interleave(segments, 0),
            "mlp.router.bias": old["mlp.router.bias"].repeat_interleave(
                segments, 0) * bias_scale,
            "mlp.experts.w1": old["mlp.experts.w1"].flatten(0, 1).unflatten(
                0, (-1, after.moe_intermediate_size)),
            "mlp.experts.w3": old["mlp.experts.w3"].flatten(0, 1).unflatten(
                0, (-1, after.moe_intermediate_size)),
            "mlp.experts.w2": old["mlp.experts.w2"].unflatten(
                2, (segments, -1)).transpose(1, 2).flatten(0, 1),
        }
        for suffix, tensor in new.items():
            tensors.new[f"{prefix}.{suffix}"] = tensor.contiguous()


def _dense_to_convert(before: ModelConfig, first: int) -> list[int]:
    """Indices (main blocks, then MTP depths) of the dense blocks that
    become MoE when first_k_dense_replace is first."""
    end = before.first_k_dense_replace if before.n_routed_experts \
        else before.num_layers + before.mtp_num_layers
    return list(range(first, end))


def grown_upcycle(before: ModelConfig, *, first_k_dense_replace: int,
                  n_routed_experts: Optional[int] = None,
                  num_experts_per_tok: Optional[int] = None,
                  n_shared_experts: Optional[int] = None,
                  moe_intermediate_size: Optional[int] = None
                  ) -> ModelConfig:
    first = first_k_dense_replace
    if not _dense_to_convert(before, first) or first < 0:
        raise _refuse("upcycle", f"first_k_dense_replace {first} makes no "
                      "dense block MoE; give a smaller value than the "
                      "model's first MoE block")
    if before.n_group > 1:
        raise _refuse("upcycle", "group-limited routing (n_group > 1) "
                      "ranks groups by their top-2 scores, which tied "
                      "segments would change")
    given = {"n_routed_experts": n_routed_experts,
             "num_experts_per_tok": num_experts_per_tok,
             "n_shared_experts": n_shared_experts,
             "moe_intermediate_size": moe_intermediate_size}
    if before.n_routed_experts:
        for name, value in given.items():
            if value is not None and value != getattr(before, name):
                raise _refuse("upcycle", f"{name} is the model's MoE "
                              f"setting, {getattr(before, name)}; leave it "
                              "out")
        after = replace(before, first_k_dense_replace=first)
    else:
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise _refuse("upcycle", f"the model has no MoE blocks yet; "
                          f"give {', '.join(missing)}")
        after = replace(before, first_k_dense_replace=first,
                        norm_topk_prob=True, **given)
    width, segment = before.ffn_hidden_size, after.moe_intermediate_size
    if width % segment:
        raise _refuse("upcycle", f"moe_intermediate_size {segment} does not "
                      f"divide ffn_hidden_size {width}")
    routed = width // segment - after.n_shared_experts
    if routed < 1:
        raise _refuse("upcycle", f"the {width // segment} segments of "
                      f"ffn_hidden_size {width} leave none for routed "
                      f"experts after n_shared_experts "
                      f"{after.n_shared_experts}")
    for name in ("n_routed_experts", "num_experts_per_tok"):
        if getattr(after, name) % routed:
            raise _refuse("upcycle", f"{name} {getattr(after, name)} must "
                          f"be a multiple of the {routed} routed segments "
                          "of each replica of the dense feed-forward")
    if before.n_routed_experts and (
            not after.norm_topk_prob
            or after.routed_scaling_factor != routed):
        raise _refuse("upcycle", f"the model's MoE blocks would need "
                      f"norm_topk_prob and routed_scaling_factor {routed} "
                      "for an upcycled block to compute what it did")
    return replace(after, routed_scaling_factor=float(routed))


def _block_prefix(config: ModelConfig, index: int) -> str:
    if index < config.num_layers:
        return f"layers.{index}"
    return f"mtp.{index - config.num_layers}.block"


def carry_upcycle(tensors: Tensors, before: ModelConfig,
                  after: ModelConfig, *, first_k_dense_replace: int,
                  **moe) -> None:
    blocks = [_block_prefix(before, index) for index in
              _dense_to_convert(before, first_k_dense_replace)]
    _copy_except(tensors, [f"{prefix}.mlp." for prefix in blocks])
    width = after.moe_intermediate_size
    shared = after.n_shared_experts * width
    routed = int(after.routed_scaling_factor)
    replicas = after.n_routed_experts // routed
    for prefix in blocks:
        w1, w3, w2 = (tensors.old[f"{prefix}.mlp.{name}.weight"]
                      for name in ("w1", "w3", "w2"))
        if shared:
            for name, tensor in (("w1", w1[:shared]), ("w3", w3[:shared]),
                                 ("w2", w2[:, :shared])):
                tensors.new[f"{prefix}.mlp.shared_experts.{name}.weight"] \
                    = tensor.contiguous()
        units = (w1[shared:], w3[shared:], w2[:, shared:])
        segments = [unit.unflatten(0, (routed, width)) for unit in units[:2]]
        segments.append(units[2].unflatten(1, (routed, width))
                        .transpose(0, 1))
        for name, tensor in zip(("w1", "w3", "w2"), segments):
            tensors.new[f"{prefix}.mlp.experts.{name}"] = \
                tensor.repeat(replicas, 1, 1)
        router = f"{prefix}.mlp.router.weight"
        rows = tensors.new[router][::routed]
        tensors.new[router] = rows.repeat_interleave(routed, 0)
