"""The MoE router's top-k selection after its matmul, in Triton.

Forward, per token, from float32 logits ``l`` over e experts: scores ``s =
sigmoid(l)`` (or ``softmax(l)``); selection scores ``b = s + bias``; with
n_group > 1 groups of consecutive experts, a group's score is the sum of
its two best ``b`` (topk_method noaux_tc, DeepSeek-V3) or its best ``b``
(group_limited_greedy, DeepSeek-V2), and only the topk_group best groups
stay selectable;
the k selectable experts of highest ``b`` are picked, best first, the
lowest index winning ties (as ``torch.topk`` on distinct values). Their
combine weights are the unbiased ``r_j = s[expert_j]``, normalised to
``w_j = f r_j / (R + 1e-20)`` with ``R = sum_j r_j`` if norm_topk_prob,
else ``w_j = f r_j``, f the routed scaling factor. A program holds a block
of tokens as a (tokens, groups, experts of a group) tile, so that a
group's best two and each pick are reductions over its last axes; the
weights are recomputed from the chosen logits.

Backward: the selection is piecewise constant, so gradients reach the
logits only through the scores, both directly (the auxiliary losses use
them) and through the weights: ``dr_j = f / (R + 1e-20) (dw_j - sum_i dw_i
r_i / (R + 1e-20))`` (``dr_j = f dw_j`` unnormalised) is added to
``ds[expert_j]``, then ``dl = ds s (1 - s)`` for sigmoid, ``dl = s (ds -
sum(ds s))`` for softmax. One kernel does it all per block of tokens,
reading the saved scores once, where a handful of PyTorch ops would each
make a pass over (t, e). On the CPU the forward runs the reference and
the backward the same formulas in plain PyTorch.

Tensor names end in their shape: t tokens; e routed experts; k experts
per token.
"""
import math

import torch
import triton
import triton.language as tl

# Routing is a chain of row reductions: small programs of a few warps,
# each warp holding whole rows, do best; the backward is a plain pass.
FORWARD_ELEMENTS = 512
BACKWARD_ELEMENTS = 2048
NUM_WARPS = 4


@triton.jit
def _best_groups_only(choice, group, inner, topk_group: tl.constexpr,
                      group_max: tl.constexpr, row_block: tl.constexpr,
                      group_block: tl.constexpr):
    """choice (rows, groups, experts in a group) with every group but
    each row's topk_group best set to -inf; a group ranks by its best
    score (group_max) or the sum of its two best."""
    first, index = tl.max(choice, axis=2, return_indices=True)
    if group_max:
        group_score = first
    else:
        second = tl.max(tl.where(inner == index[:, :, None],
                                 -float("inf"), choice), axis=2)
        group_score = first + second
    keep = tl.zeros([row_block, group_block], tl.int1)
    for _ in tl.static_range(topk_group):
        _, best = tl.max(group_score, axis=1, return_indices=True)
        picked = group[None, :] == best[:, None]
        keep = keep | picked
        group_score = tl.where(picked, -float("inf"), group_score)
    return tl.where(keep[:, :, None], choice, -float("inf"))


@triton.jit
def _top_k(choice, group, column, size, slots, k: tl.constexpr,
           row_block: tl.constexpr, k_block: tl.constexpr):
    """Each row's k highest entries of choice, as expert ids (rows,
    k_block); ties go to the lowest index: within a group, then among
    groups."""
    chosen = tl.zeros([row_block, k_block], tl.int64)
    for j in tl.static_range(k):
        value, index = tl.max(choice, axis=2, return_indices=True)
        _, best = tl.max(value, axis=1, return_indices=True)
        index = tl.sum(tl.where(group[None, :] == best[:, None], index, 0),
                       axis=1)
        expert = best * size + index
        choice = tl.where(column == expert[:, None, None], -float("inf"),
                          choice)
        chosen = tl.where(slots == j, expert[:, None], chosen)
    return chosen


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, scores_ptr, weights_ptr,
                  experts_ptr, tokens, experts, factor, k: tl.constexpr,
                  softmax: tl.constexpr, groups: tl.constexpr,
                  topk_group: tl.constexpr, group_max: tl.constexpr,
                  normalise: tl.constexpr,
                  row_block: tl.constexpr, group_block: tl.constexpr,
                  size_block: tl.constexpr, k_block: tl.constexpr):
    # A tile (rows, groups, experts in a group); padded entries are -inf.
    rows = (tl.program_id(0).to(tl.int64) * row_block
            + tl.arange(0, row_block))
    group = tl.arange(0, group_block)
    size = experts // groups
    inner = tl.arange(0, size_block)[None, None, :]
    column = group[None, :, None] * size + inner
    valid = (group < groups)[None, :, None] & (inner < size)
    row_mask = rows < tokens
    offsets = rows[:, None, None] * experts + column
    mask = row_mask[:, None, None] & valid
    logits = tl.load(logits_ptr + offsets, mask=mask, other=0.0)
    logits = tl.where(valid, logits, -float("inf"))
    if softmax:
        top = tl.max(tl.max(logits, axis=2), axis=1)
        exp = tl.exp(logits - top[:, None, None])
        total = tl.sum(tl.sum(exp, axis=2), axis=1)
        scores = exp / total[:, None, None]
    else:
        scores = tl.sigmoid(logits)
    tl.store(scores_ptr + offsets, scores, mask=mask)
    bias = tl.load(bias_ptr + column, mask=valid, other=0.0)
    choice = tl.where(valid, scores + bias.to(tl.float32), -float("inf"))
    if groups > 1:
        choice = _best_groups_only(choice, group, inner, topk_group,
                                   group_max, row_block, group_block)
    slots = tl.arange(0, k_block)[None, :]
    chosen = _top_k(choice, group, column, size, slots, k, row_block,
                    k_block)
    # The weights: the chosen scores, recomputed from their logits.
    k_offsets = rows[:, None] * k + slots
    k_mask = row_mask[:, None] & (slots < k)
    logits = tl.load(logits_ptr + rows[:, None] * experts + chosen,
                     mask=k_mask, other=0.0)
    if softmax:
        weights = tl.exp(logits - top[:, None]) / total[:, None]
    else:
        weights = tl.sigmoid(logits)
    weights = tl.where(k_mask, weights, 0.0)
    if normalise:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    tl.store(weights_ptr + k_offsets, weights * factor, mask=k_mask)
    tl.store(experts_ptr + k_offsets, chosen, mask=k_mask)


@triton.jit
def _route_backward_kernel(dscores_ptr, dweights_ptr, scores_ptr,
                           experts_ptr, dlogits_ptr, tokens, experts, factor,
                           k: tl.constexpr, softmax: tl.constexpr,
                           normalise: tl.constexpr, row_block: tl.constexpr,
                           block: tl.constexpr, k_block: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * row_block
            + tl.arange(0, row_block))
    columns = tl.arange(0, block)
    row_mask = rows < tokens
    mask = row_mask[:, None] & (columns < experts)[None, :]
    offsets = rows[:, None] * experts + columns[None, :]
    scores = tl.load(scores_ptr + offsets, mask=mask, other=0.0)
    dscores = tl.load(dscores_ptr + offsets, mask=mask, other=0.0)
    slots = tl.arange(0, k_block)[None, :]
    k_offsets = rows[:, None] * k + slots
    k_mask = row_mask[:, None] & (slots < k)
    chosen = tl.load(experts_ptr + k_offsets, mask=k_mask, other=0)
    dweights = tl.load(dweights_ptr + k_offsets, mask=k_mask, other=0.0)
    if normalise:
        raw = tl.load(scores_ptr + rows[:, None] * experts + chosen,
                      mask=k_mask, other=0.0)
        total = tl.sum(raw, axis=1)[:, None] + 1e-20
        draw = factor / total * (
            dweights - tl.sum(dweights * raw, axis=1)[:, None] / total)
    else:
        draw = factor * dweights
    for j in tl.static_range(k):
        index = tl.sum(tl.where(slots == j, chosen, 0), axis=1)
        dweight = tl.sum(tl.where(slots == j, draw, 0.0), axis=1)
        dscores += tl.where(columns[None, :] == index[:, None],
                            dweight[:, None], 0.0)
    if softmax:
        dlogits = scores * (dscores
                            - tl.sum(dscores * scores, axis=1)[:, None])
    else:
        dlogits = dscores * scores * (1.0 - scores)
    tl.store(dlogits_ptr + offsets, dlogits, mask=mask)


def _row_block(per_program: int, per_row: int) -> int:
    return max(1, per_program // per_row)


@torch.library.custom_op("coom::route", mutates_args=())
def route_forward(logits_te: torch.Tensor, bias_e: torch.Tensor, k: int,
                  softmax: bool, n_group: int, topk_group: int,
                  normalise: bool, factor: float, group_max: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores_te, weights_tk, experts_tk) from float32 logits: softmax
    or sigmoid scores, k experts per token from the topk_group best of
    n_group groups (ranked by their best score if group_max, else by
    their best two), weights normalised or not, times factor."""
    tokens, experts = logits_te.shape
    logits_te = logits_te.contiguous()
    scores_te = torch.empty_like(logits_te)
    weights_tk = logits_te.new_empty(tokens, k)
    experts_tk = logits_te.new_empty(tokens, k, dtype=torch.int64)
    group_block = triton.next_power_of_2(n_group)
    size_block = triton.next_power_of_2(experts // n_group)
    row_block = _row_block(FORWARD_ELEMENTS, group_block * size_block)
    if tokens:
        _route_kernel[(triton.cdiv(tokens, row_block),)](
            logits_te, bias_e, scores_te, weights_tk, experts_tk, tokens,
            experts, factor, k=k, softmax=softmax, groups=n_group,
            topk_group=topk_group, group_max=group_max, normalise=normalise,
            row_block=row_block,
            group_block=group_block, size_block=size_block,
            k_block=triton.next_power_of_2(k),
            num_warps=min(row_block, NUM_WARPS))
    return scores_te, weights_tk, experts_tk


@route_forward.register_kernel("cpu")
def _(logits_te, bias_e, k, softmax, n_group, topk_group, normalise, factor,
      group_max):
    return route_reference(
        logits_te, bias_e, k, "softmax" if softmax else "sigmoid", n_group,
        topk_group, "group_limited_greedy" if group_max else "noaux_tc",
        normalise, factor)


@route_forward.register_fake
def _(logits_te, bias_e, k, softmax, n_group, topk_group, normalise,
      factor, group_max):
    tokens = logits_te.shape[0]
    return (torch.empty_like(logits_te), logits_te.new_empty(tokens, k),
            logits_te.new_empty(tokens, k, dtype=torch.int64))


@torch.library.custom_op("coom::route_backward", mutates_args=())
def route_backward(dscores_te: torch.Tensor, dweights_tk: torch.Tensor,
                   scores_te: torch.Tensor, experts_tk: torch.Tensor,
                   softmax: bool, normalise: bool,
                   factor: float) -> torch.Tensor:
    """The gradient of the logits from those of the scores and weights."""
    tokens, experts = scores_te.shape
    k = experts_tk.shape[1]
    dlogits_te = torch.empty_like(scores_te)
    block = triton.next_power_of_2(experts)
    row_block = _row_block(BACKWARD_ELEMENTS, block)
    if tokens:
        _route_backward_kernel[(triton.cdiv(tokens, row_block),)](
            dscores_te.contiguous(), dweights_tk.contiguous(), scores_te,
            experts_tk, dlogits_te, tokens, experts, factor, k=k,
            softmax=softmax, normalise=normalise, row_block=row_block,
            block=block, k_block=triton.next_power_of_2(k),
            num_warps=NUM_WARPS)
    return dlogits_te


@route_backward.register_kernel("cpu")
def _(dscores_te, dweights_tk, scores_te, experts_tk, softmax, normalise,
      factor):
    draw_tk = factor * dweights_tk
    if normalise:
        raw_tk = scores_te.gather(1, experts_tk)
        total_t1 = raw_tk.sum(1, keepdim=True) + 1e-20
        draw_tk = draw_tk / total_t1 - factor * (
            dweights_tk * raw_tk).sum(1, keepdim=True) / total_t1.square()
    dscores_te = dscores_te.scatter_add(1, experts_tk, draw_tk)
    if softmax:
        return scores_te * (
            dscores_te - (dscores_te * scores_te).sum(1, keepdim=True))
    return dscores_te * scores_te * (1.0 - scores_te)


@route_backward.register_fake
def _(dscores_te, dweights_tk, scores_te, experts_tk, softmax, normalise,
      factor):
    return torch.empty_like(scores_te)


def _setup(ctx, inputs, output):
    ctx.softmax, ctx.normalise, ctx.factor = inputs[3], inputs[6], inputs[7]
    scores_te, _, experts_tk = output
    ctx.save_for_backward(scores_te, experts_tk)


def _backward(ctx, dscores_te, dweights_tk, _):
    scores_te, experts_tk = ctx.saved_tensors
    dlogits_te = route_backward(dscores_te, dweights_tk, scores_te,
                                experts_tk, ctx.softmax, ctx.normalise,
                                ctx.factor)
    return dlogits_te, None, None, None, None, None, None, None, None


route_forward.register_autograd(_backward, setup_context=_setup)


def route(logits_te: torch.Tensor, bias_e: torch.Tensor,
          num_experts_per_tok: int, scoring_func: str, n_group: int,
          topk_group: int, topk_method: str, norm_topk_prob: bool,
          routed_scaling_factor: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores (t, e), combine weights (t, k) and expert ids (t, k) of
    router logits, computed in float32, the arguments named as in
    ModelConfig."""
    return route_forward(logits_te.float(), bias_e, num_experts_per_tok,
                         scoring_func == "softmax", n_group, topk_group,
                         norm_topk_prob, routed_scaling_factor,
                         topk_method == "group_limited_greedy")


def route_reference(logits_te: torch.Tensor, bias_e: torch.Tensor,
                    num_experts_per_tok: int, scoring_func: str,
                    n_group: int, topk_group: int, topk_method: str,
                    norm_topk_prob: bool, routed_scaling_factor: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same function in plain PyTorch."""
    if scoring_func == "softmax":
        scores_te = logits_te.softmax(dim=-1)
    else:
        scores_te = logits_te.sigmoid()
    choice_te = scores_te + bias_e
    if n_group > 1:
        choice_tgx = choice_te.unflatten(-1, (n_group, -1))
        if topk_method == "group_limited_greedy":
            group_scores_tg = choice_tgx.amax(dim=-1)
        else:
            group_scores_tg = choice_tgx.topk(2, dim=-1).values.sum(dim=-1)
        best_tg = group_scores_tg.topk(topk_group, dim=-1).indices
        keep_tg = torch.zeros_like(group_scores_tg, dtype=torch.bool)
        keep_tg.scatter_(1, best_tg, True)
        keep_te = keep_tg.unsqueeze(-1).expand_as(choice_tgx).flatten(1)
        choice_te = choice_te.masked_fill(~keep_te, -math.inf)
    experts_tk = choice_te.topk(num_experts_per_tok, dim=-1).indices
    weights_tk = scores_te.gather(1, experts_tk)
    if norm_topk_prob:
        weights_tk = weights_tk / (weights_tk.sum(-1, keepdim=True) + 1e-20)
    return scores_te, weights_tk * routed_scaling_factor, experts_tk
