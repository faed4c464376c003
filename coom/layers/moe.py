"""DeepSeekMoE: shared experts plus fine-grained routed experts.

The layer runs in phases, as Megatron-Core splits it, so that expert
parallelism slots in between them from outside:

1. route: the router scores every expert in float32 and picks
   ``num_experts_per_tok`` of them per token, optionally only from the
   ``topk_group`` best of ``n_group`` groups (ranked as ``topk_method``
   says);
2. permute: token copies are sorted by expert (``Copies``: the experts
   make them, and FP8 experts read each copy from its token as they
   quantise it);
3. experts: one grouped SwiGLU over the sorted copies (``torch._grouped_mm``
   on a GPU, a loop over the groups elsewhere), nothing dropped. Expert
   parallelism (``coom.parallel.expert``) replaces the experts with a
   module that dispatches the copies to the processes that hold their
   experts, runs its own, and brings the results back; FP8
   (``coom.fp8.convert``) replaces them with one whose products run in
   FP8;
4. combine: each copy is weighted and summed back into its token.

Built with ``fused_kernels``, the routing after the router matmul calls
the op of ``coom.kernels.router``, permute and combine those of
``coom.kernels.permute``, and the experts' gating that of
``coom.kernels.swiglu`` (each Triton on GPUs, its reference elsewhere);
without, the plain references.

Auxiliary-loss-free balancing (DeepSeek-V3) adds a per-expert ``bias`` to
the scores for selection only; the combine weights use the unbiased
scores. The bias is a persistent buffer, saved with the weights and never
trained by gradients; ``coom.parallel.balance`` moves it after optimizer
steps, by the load each training forward counts. The weighted auxiliary
losses enter the backward through the layer's own output
(``AuxLossGradient``), so whoever runs the model differentiates only its
language-model losses.

Tensor names end in their shape: b batch; s sequence; t tokens (b * s); d
model width; e routed experts; k experts per token; g groups; i expert
width; c token copies (t * k).
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional

from coom.config import ModelConfig
from coom.kernels.autocast import autocast_off, product_dtype
from coom.kernels.permute import (
    copy_positions,
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)
from coom.kernels.router import route, route_reference
from coom.kernels.swiglu import swiglu, swiglu_reference
from coom.layers.mlp import SwiGLU
from coom.layers.recompute import direct


class Router(nn.Module):
    """Scores experts and picks each token's top-k.

    Args:
        config: the model config (the MoE routing fields).
        fused_kernels: call the fused routing op rather than the
            reference.
    """

    def __init__(self, config: ModelConfig, fused_kernels: bool = True):
        super().__init__()
        self.config = config
        self.fused_kernels = fused_kernels
        experts = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(experts, config.hidden_size))
        self.register_buffer("bias", torch.empty(experts))

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        nn.init.zeros_(self.bias)

    def forward(self, x_td: torch.Tensor):
        """Returns float32 logits and affinities (t, e), combine weights
        (t, k) and expert ids (t, k)."""
        config = self.config
        # In float32 even under autocast, which would run it in bf16.
        with autocast_off(x_td.device.type):
            logits_te = functional.linear(x_td.float(), self.weight.float())
        select = route if self.fused_kernels else route_reference
        scores_te, weights_tk, experts_tk = select(
            logits_te, self.bias, config.num_experts_per_tok,
            config.scoring_func, config.n_group, config.topk_group,
            config.topk_method, config.norm_topk_prob,
            config.routed_scaling_factor)
        return logits_te, scores_te, weights_tk, experts_tk


# torch._grouped_mm reads operands whose row strides are multiples of 16
# bytes (in bf16, widths that are multiples of 8) and refuses others: on
# an H100 (2026-12-06) a bf16 MoE of hidden 70 or expert width 20 failed
# unpadded, and padded it ran forward and backward with the error of an
# aligned one.
GROUPED_MM_ALIGNMENT = 16


def grouped_mm(x_cd: torch.Tensor, weight_eod: torch.Tensor,
               counts_e: torch.Tensor) -> torch.Tensor:
    """x @ weight[e].T for each expert's consecutive rows of x, in one
    torch._grouped_mm of x's dtype. Widths it cannot stride are padded
    with zeros, which add nothing to the products, and the padding is
    cut off the result."""
    multiple = GROUPED_MM_ALIGNMENT // x_cd.element_size()
    width = weight_eod.shape[1]
    pad_in, pad_out = -x_cd.shape[1] % multiple, -width % multiple
    weight_eod = weight_eod.to(x_cd.dtype)
    if pad_in or pad_out:
        x_cd = functional.pad(x_cd, (0, pad_in))
        weight_eod = functional.pad(weight_eod, (0, pad_in, 0, pad_out))
    offsets = counts_e.cumsum(0).to(torch.int32)
    out_cd = torch._grouped_mm(x_cd, weight_eod.transpose(-2, -1),
                               offs=offsets)
    return out_cd[:, :width].contiguous()


def grouped_matmul(x_cd: torch.Tensor, weight_eod: torch.Tensor,
                   counts_e: torch.Tensor) -> torch.Tensor:
    """x @ weight[e].T for each expert's consecutive rows of x (on the
    meta device, where the planner counts what a GPU holds, as on a
    GPU)."""
    if x_cd.is_cuda or x_cd.is_meta:
        return grouped_mm(x_cd, weight_eod, counts_e)
    chunks = x_cd.split(counts_e.tolist())
    return torch.cat([chunk @ weight_eod[e].T
                      for e, chunk in enumerate(chunks)])


@dataclass
class Copies:
    """A MoE layer's token copies in expert order, as yet unmade: row
    copy_tk[t, j] of ``rows()`` is x_td[t]. The experts make them, or
    read each copy from its token where they can (FP8 experts quantise
    the copies straight from the tokens, ``coom.fp8.modules``)."""

    x_td: torch.Tensor
    copy_tk: torch.Tensor
    fused_kernels: bool
    """Copy with the op of ``coom.kernels.permute``, else the
    reference."""

    def rows(self) -> torch.Tensor:
        """The copies, made."""
        if self.fused_kernels:
            return permute(self.x_td, self.copy_tk)
        return permute_reference(self.x_td, self.copy_tk)

    def sources(self) -> torch.Tensor:
        """The token of each copy (c,)."""
        tokens, k = self.copy_tk.shape
        tokens_c = torch.arange(tokens, device=self.copy_tk.device) \
            .repeat_interleave(k)
        sources_c = torch.empty_like(tokens_c)
        sources_c[self.copy_tk.flatten()] = tokens_c
        return sources_c


def rows_of(x_cd: torch.Tensor | Copies) -> torch.Tensor:
    """Rows given, or the copies made."""
    return x_cd.rows() if isinstance(x_cd, Copies) else x_cd


class GroupedExperts(nn.Module):
    """The routed experts' SwiGLU weights, stacked: w1, w3 (e, i, d) and
    w2 (e, d, i). FP8 (``coom.fp8.convert``) and expert parallelism
    (``coom.parallel.expert``) replace the module with ones that keep
    these weights under the same names.

    Args:
        config: the model config.
        fused_kernels: call the fused gating op rather than the
            reference.
    """

    def __init__(self, config: ModelConfig, fused_kernels: bool = True):
        super().__init__()
        shape = (config.n_routed_experts, config.moe_intermediate_size,
                 config.hidden_size)
        self.config = config
        self.fused_kernels = fused_kernels
        self.w1 = nn.Parameter(torch.empty(shape))
        self.w3 = nn.Parameter(torch.empty(shape))
        self.w2 = nn.Parameter(torch.empty(shape[0], shape[2], shape[1]))
        self.recompute = direct

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x_cd: torch.Tensor | Copies, counts_e: torch.Tensor,
                beside: Optional[Callable[[], torch.Tensor]] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """SwiGLU of rows sorted by expert (or of the ``Copies`` that
        make them), counts_e rows per expert; and beside's result (None
        without): the layer's work that needs none of the experts'
        output, which expert parallelism (``coom.parallel.expert``) runs
        while the rows are in flight."""
        # The copies are made before beside runs: the tokens' gradient
        # then sums its parts in one order whatever the layout.
        x_cd = rows_of(x_cd)
        besides = None if beside is None else beside()
        return self.run(x_cd, counts_e, self.w1, self.w3, self.w2), besides

    def run(self, x_cd: torch.Tensor, counts_e: torch.Tensor,
            w1: torch.Tensor, w3: torch.Tensor,
            w2: torch.Tensor) -> torch.Tensor:
        """SwiGLU of rows sorted by expert, counts_e rows for each of the
        experts whose weights are given (this module's own, or those of
        a process's expert slots)."""
        return self.recompute(self.compute, x_cd, counts_e, w1, w3, w2)

    def compute(self, x_cd: torch.Tensor, counts_e: torch.Tensor,
                w1: torch.Tensor, w3: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
        """What run computes."""
        gate, up = self.products(x_cd, counts_e, w1, w3)
        gating = swiglu if self.fused_kernels else swiglu_reference
        (out,) = self.products(gating(gate, up), counts_e, w2)
        return out

    def products(self, x_cd: torch.Tensor, counts_e: torch.Tensor,
                 *weights_eod: torch.Tensor) -> list[torch.Tensor]:
        """x_e @ weight[e]^T for each expert's consecutive rows and each
        of weights_eod."""
        return [grouped_matmul(x_cd, weight_eod, counts_e)
                for weight_eod in weights_eod]


def balance_loss(scores_bse: torch.Tensor, experts_bsk: torch.Tensor,
                 per_sequence: bool) -> torch.Tensor:
    """sum_i f_i * P_i, DeepSeek-V3's balance loss before its weight.

    f_i is expert i's share of the routed token copies times the number of
    experts (1 when balanced) and P_i the mean normalised affinity to it,
    both over each sequence (averaged over sequences) or over the batch.
    """
    if not per_sequence:
        scores_bse = scores_bse.flatten(0, 1).unsqueeze(0)
        experts_bsk = experts_bsk.flatten(0, 1).unsqueeze(0)
    batch, tokens, experts = scores_bse.shape
    copies = experts_bsk.shape[-1] * tokens
    counts_be = torch.zeros(batch, experts, device=scores_bse.device)
    counts_be.scatter_add_(1, experts_bsk.flatten(1),
                           torch.ones_like(experts_bsk.flatten(1),
                                           dtype=counts_be.dtype))
    fraction_be = counts_be * experts / copies
    normalised = scores_bse / scores_bse.sum(-1, keepdim=True)
    return (fraction_be * normalised.mean(dim=1)).sum(-1).mean()


def in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x as autocast would cast a matmul's input: autocast does not reach
    _grouped_mm, which takes only bf16 on GPUs, so the routed tokens are
    cast before their copies are gathered."""
    return x.to(product_dtype(x))


class AuxLossGradient(torch.autograd.Function):
    """Passes x through; its backward also gives aux_loss the gradient
    scale, as if scale * aux_loss were added to what is differentiated."""

    @staticmethod
    def forward(ctx, x, aux_loss, scale: float):
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, device=grad.device), None


class MoE(nn.Module):
    """Shared experts plus routed experts, and their balancing.

    Each training forward adds the routed load to ``tokens_per_expert``
    and its weighted auxiliary losses to ``aux_loss_sum`` (detached), and
    attaches their gradient, times ``aux_loss_scale``, to its output.
    ``coom.parallel.balance`` reads and resets both after each optimizer
    step.

    Args:
        config: the model config.
        fused_kernels: call the fused ops (routing, permutation, gating)
            rather than their references.
    """

    def __init__(self, config: ModelConfig, fused_kernels: bool = True):
        super().__init__()
        self.config = config
        self.fused_kernels = fused_kernels
        self.router = Router(config, fused_kernels)
        self.experts = GroupedExperts(config, fused_kernels)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = SwiGLU(
                config.hidden_size,
                config.n_shared_experts * config.moe_intermediate_size,
                fused_kernels)
        self.register_buffer("tokens_per_expert",
                             torch.empty(config.n_routed_experts),
                             persistent=False)
        self.register_buffer("aux_loss_sum", torch.empty(()),
                             persistent=False)
        self.aux_loss_scale = 1.0
        """The auxiliary losses' weight per forward: 1 where a forward is
        a step; the share of a micro-batch in a step of several."""
        self.recompute = direct
        """How ``routed`` runs (``coom.layers.recompute``): full
        recomputation keeps only its inputs."""

    def init_weights(self, std: float) -> None:
        out_std = std / math.sqrt(2 * self.config.num_layers)
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, self.config.num_layers)
        nn.init.zeros_(self.tokens_per_expert)
        nn.init.zeros_(self.aux_loss_sum)

    @property
    def has_aux_loss(self) -> bool:
        config = self.config
        return bool(config.moe_z_loss_coeff or config.moe_seq_aux_loss_coeff
                    or config.moe_aux_loss_coeff)

    def _counts(self, experts_tk: torch.Tensor) -> torch.Tensor:
        """Token copies routed to each expert (e,)."""
        # scatter_add rather than bincount: its size does not depend on
        # the data, which torch.compile needs.
        flat_c = experts_tk.flatten()
        counts_e = flat_c.new_zeros(self.config.n_routed_experts)
        return counts_e.scatter_add_(0, flat_c, torch.ones_like(flat_c))

    def _balance(self, logits_te: torch.Tensor, scores_te: torch.Tensor,
                 experts_tk: torch.Tensor, counts_e: torch.Tensor,
                 shape: torch.Size) -> Optional[torch.Tensor]:
        """In training: count the routed load, and return the weighted
        auxiliary losses (None without any), whose sum it counts too."""
        if not self.training:
            return None
        self.tokens_per_expert += counts_e
        if not self.has_aux_loss:
            return None
        aux_loss = self._aux_loss(logits_te, scores_te, experts_tk, shape)
        self.aux_loss_sum += aux_loss.detach()
        return aux_loss

    def _aux_loss(self, logits_te: torch.Tensor, scores_te: torch.Tensor,
                  experts_tk: torch.Tensor,
                  shape: torch.Size) -> torch.Tensor:
        config = self.config
        loss = logits_te.new_zeros(())
        if config.moe_z_loss_coeff:
            loss = loss + config.moe_z_loss_coeff * \
                logits_te.logsumexp(-1).square().mean()
        if config.moe_seq_aux_loss_coeff or config.moe_aux_loss_coeff:
            scores_bse = scores_te.unflatten(0, shape)
            experts_bsk = experts_tk.unflatten(0, shape)
            for coeff, per_sequence in (
                    (config.moe_seq_aux_loss_coeff, True),
                    (config.moe_aux_loss_coeff, False)):
                if coeff:
                    loss = loss + coeff * balance_loss(
                        scores_bse, experts_bsk, per_sequence)
        return loss

    def forward(self, x_bsd: torch.Tensor) -> torch.Tensor:
        x_td = x_bsd.flatten(0, 1)
        logits_te, scores_te, weights_tk, experts_tk = self.router(x_td)
        counts_e = self._counts(experts_tk)
        aux_loss = self._balance(logits_te, scores_te, experts_tk,
                                 counts_e, x_bsd.shape[:2])
        order_c = experts_tk.flatten().argsort(stable=True)
        copy_tk = copy_positions(order_c, self.config.num_experts_per_tok)
        out_td, shared_td = self.recompute(
            self.routed, in_autocast_dtype(x_td), copy_tk, counts_e,
            weights_tk)
        if shared_td is not None:
            out_td = out_td + shared_td
        if aux_loss is not None:
            out_td = AuxLossGradient.apply(out_td, aux_loss,
                                           self.aux_loss_scale)
        return out_td.view_as(x_bsd)

    def routed(self, x_td: torch.Tensor, copy_tk: torch.Tensor,
               counts_e: torch.Tensor, weights_tk: torch.Tensor
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What the experts make of the routed tokens x_td: the routed
        experts' outputs, weighted and summed per token, and the shared
        experts' (None without), computed while the copies travel under
        expert parallelism."""
        shared = None if self.shared_experts is None \
            else partial(self.shared_experts, x_td)
        y_cd, shared_td = self.experts(
            Copies(x_td, copy_tk, self.fused_kernels), counts_e,
            beside=shared)
        return self.combine(y_cd, weights_tk, copy_tk), shared_td

    def combine(self, y_cd: torch.Tensor, weights_tk: torch.Tensor,
                copy_tk: torch.Tensor) -> torch.Tensor:
        """Each token's copies, weighted and summed back into it."""
        if self.fused_kernels:
            return unpermute(y_cd, weights_tk, copy_tk)
        return unpermute_reference(y_cd, weights_tk, copy_tk)
