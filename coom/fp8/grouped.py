"""The routed experts' grouped products in FP8.

Rows (token copies) come sorted by expert, ``counts_e`` rows for expert
e, and expert e's rows are multiplied by its own weight: y_e = x_e W_e^T.
Each expert's rows form their own groups for scaling, so no 1 x 128 tile
of the weight gradient (which sums over rows) mixes two experts.

On GPUs the products run in COOM's Triton grouped FP8 kernels, for the
blockwise recipe only; emulated, any recipe runs, one expert at a time.

Tensor names end in their shape: c rows (token copies); e experts; o
output width; d input width.
"""
from collections.abc import Sequence
from typing import Optional

import torch

from coom.fp8 import ops
from coom.fp8.linear import (
    FP8Recipe,
    _EmulatedFP8Linear,
    emulated_weight_forms,
    needs_grad,
)
from coom.kernels.autocast import autocast_off, product_dtype
from coom.kernels.permute import unpermute
from coom.kernels.swiglu import swiglu, swiglu_backward
from coom.layers.moe import Copies


def grouped_weight_forms(weight_eod: torch.Tensor,
                         recipe: FP8Recipe) -> tuple[torch.Tensor, ...]:
    """What the grouped products multiply by in place of the experts'
    weights: on FP8 units, the values and scales of each expert's 128 x
    128 blocks and the values of its W^T; emulated, each expert's W and
    W^T rounded (``emulated_weight_forms``), stacked."""
    if recipe.emulate:
        forms = [emulated_weight_forms(weight_od, recipe.scaling,
                                       recipe.power_of_two)
                 for weight_od in weight_eod]
        return tuple(torch.stack(form) for form in zip(*forms))
    return ops.quantize_blocks_and_transpose(weight_eod, recipe.power_of_two)


def _emulated(x_cd: torch.Tensor, weight_eod: torch.Tensor,
              counts_e: torch.Tensor, recipe: FP8Recipe,
              forms: Sequence[torch.Tensor]) -> torch.Tensor:
    chunks = x_cd.split(counts_e.tolist())
    return torch.cat([
        _EmulatedFP8Linear.apply(chunk, weight_eod[e], recipe.scaling,
                                 recipe.power_of_two,
                                 *(form[e] for form in forms))
        for e, chunk in enumerate(chunks)])


def _forward(x_cd: torch.Tensor, counts_e: torch.Tensor, power_of_two: bool,
             out_dtype: torch.dtype, weights_eod: Sequence[torch.Tensor],
             backward: bool, forms: Sequence[tuple] = (),
             sources_c: Optional[torch.Tensor] = None):
    """Each expert's rows times its weights, x quantised once: (outputs,
    the FP8 x^T and each weight's K-major copy and scales that the
    backward multiplies). Without backward, those are not made and the
    list is empty. The weights' FP8 forms are those given
    (``grouped_weight_forms``, one tuple per weight), or made here. With
    sources (and backward), the rows are x[sources], read where they
    are."""
    # Built with extend, not starred unpacking and +=: dynamo traces a
    # starred target as a tuple, and tuple += list breaks the graph.
    saved = []
    if backward:
        x_values, x_scales, x_values_t, x_scales_t = (
            ops.quantize_rows_and_transpose(x_cd, power_of_two, counts_e)
            if sources_c is None else ops.gathered_rows_and_transpose(
                x_cd, sources_c, power_of_two, counts_e))
        saved.extend([x_values_t, x_scales_t])
    else:
        x_values, x_scales = ops.quantize_rows(x_cd, power_of_two)
    outputs = []
    for index, weight_eod in enumerate(weights_eod):
        if forms:
            values, scales, values_t = forms[index]
            if backward:
                saved.extend([values_t, scales])
        elif backward:
            values, scales, values_t = ops.quantize_blocks_and_transpose(
                weight_eod, power_of_two)
            saved.extend([values_t, scales])
        else:
            values, scales = ops.quantize_blocks(weight_eod, power_of_two)
        outputs.append(ops.grouped_mm(x_values, x_scales, values, scales,
                                      counts_e, out_dtype))
    return tuple(outputs), saved


def _gradients(dy_co: torch.Tensor, weight_values_t: torch.Tensor,
               weight_scales: torch.Tensor, x_values_t: torch.Tensor,
               x_scales_t: torch.Tensor, counts_e: torch.Tensor,
               power_of_two: bool, x_dtype: torch.dtype,
               weight_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The input gradient (in x_dtype) and the weight gradient of one
    grouped product, from its output gradient (quantised here), the
    weight's K-major FP8 copy and scales, and x^T's FP8 columns. The
    weight gradient is summed in float32 and stored in weight_dtype, the
    dtype autograd would cast it to: a bf16 compute weight's gradient is
    never written in float32."""
    dy_values, dy_scales, dy_values_t, dy_scales_t = \
        ops.quantize_rows_and_transpose(dy_co.contiguous(), power_of_two,
                                        counts_e)
    dx = ops.grouped_mm(dy_values, dy_scales, weight_values_t,
                        weight_scales.transpose(-2, -1), counts_e, x_dtype)
    return dx, ops.grouped_mm_wgrad(dy_values_t, dy_scales_t, x_values_t,
                                    x_scales_t, counts_e, weight_dtype)


class _FP8GroupedLinear(torch.autograd.Function):
    """The three grouped products in COOM's Triton kernels, blockwise:
    forward and input gradient with 1 x 128 tiles against 128 x 128
    weight blocks, weight gradient with 1 x 128 tiles along each
    expert's rows on both operands. x is quantised once for all the
    weights and kept for the backward as the FP8 copy of x^T that the
    weight gradients read. The tensors are the count weights, then, if
    kept, their FP8 forms (``grouped_weight_forms``), three for each,
    flat. With copy_tk, x is the tokens whose copies (``coom.layers.moe.
    Copies``) are the rows: they are quantised from the tokens where
    they are (sources_c, each copy's token), never written in x's
    dtype, and x's gradient sums its copies' (the permutation's
    backward)."""

    @staticmethod
    def forward(ctx, x_cd, copy_tk, sources_c, counts_e, power_of_two,
                out_dtype, count, *tensors):
        weights_eod, kept = tensors[:count], tensors[count:]
        forms = [kept[index:index + 3] for index in range(0, len(kept), 3)]
        outputs, saved = _forward(x_cd, counts_e, power_of_two, out_dtype,
                                  weights_eod, True, forms, sources_c)
        x_values_t, x_scales_t, *weights_t = saved
        ctx.save_for_backward(x_values_t, x_scales_t, counts_e, copy_tk,
                              *weights_t)
        ctx.power_of_two, ctx.x_dtype = power_of_two, x_cd.dtype
        ctx.weight_dtypes = [weight.dtype for weight in weights_eod]
        ctx.kept = len(kept)
        return outputs

    @staticmethod
    def backward(ctx, *dys_co):
        (x_values_t, x_scales_t, counts_e, copy_tk,
         *weights_t) = ctx.saved_tensors
        dx_cd, dweights_eod = None, []
        for dy_co, weight_values_t, weight_scales, weight_dtype in zip(
                dys_co, weights_t[::2], weights_t[1::2], ctx.weight_dtypes):
            dx, dweight = _gradients(dy_co, weight_values_t, weight_scales,
                                     x_values_t, x_scales_t, counts_e,
                                     ctx.power_of_two, ctx.x_dtype,
                                     weight_dtype)
            dx_cd = dx if dx_cd is None else dx_cd + dx
            dweights_eod.append(dweight)
        if copy_tk is not None:
            dx_cd = unpermute(dx_cd, None, copy_tk)
        return (dx_cd, None, None, None, None, None, None, *dweights_eod,
                *[None] * ctx.kept)


class _FP8GatedDown(torch.autograd.Function):
    """The experts' down product of their gated units, y_e = (silu(gate)
    * up)_e W_e^T, in COOM's Triton kernels, blockwise, with the gating
    fused into the quantisation of its output (``ops.
    swiglu_rows_and_transpose``): the gated units are never written in
    their own dtype, only as the FP8 rows the product reads and the FP8
    columns its weight gradient reads. The backward is that of the
    gating followed by ``_FP8GroupedLinear``, op for op. The tensors
    after the weight are its kept FP8 forms (``grouped_weight_forms``),
    if any."""

    @staticmethod
    def forward(ctx, gate_ci, up_ci, counts_e, power_of_two, out_dtype,
                weight_edi, *forms):
        h_values, h_scales, h_values_t, h_scales_t = (
            ops.swiglu_rows_and_transpose(gate_ci, up_ci, power_of_two,
                                          counts_e))
        if forms:
            values, scales, values_t = forms
        else:
            values, scales, values_t = ops.quantize_blocks_and_transpose(
                weight_edi, power_of_two)
        ctx.save_for_backward(gate_ci, up_ci, h_values_t, h_scales_t,
                              counts_e, values_t, scales)
        ctx.power_of_two, ctx.kept = power_of_two, len(forms)
        ctx.weight_dtype = weight_edi.dtype
        return ops.grouped_mm(h_values, h_scales, values, scales, counts_e,
                              out_dtype)

    @staticmethod
    def backward(ctx, dy_cd):
        (gate_ci, up_ci, h_values_t, h_scales_t, counts_e, values_t,
         scales) = ctx.saved_tensors
        dh_ci, dweight_edi = _gradients(dy_cd, values_t, scales, h_values_t,
                                        h_scales_t, counts_e,
                                        ctx.power_of_two, gate_ci.dtype,
                                        ctx.weight_dtype)
        dgate_ci, dup_ci = swiglu_backward(dh_ci, gate_ci, up_ci)
        return (dgate_ci, dup_ci, None, None, None, dweight_edi,
                *[None] * ctx.kept)


def fp8_gated_grouped_linear(gate_ci: torch.Tensor, up_ci: torch.Tensor,
                             weight_edi: torch.Tensor,
                             counts_e: torch.Tensor, recipe: FP8Recipe,
                             forms: Sequence[torch.Tensor] = ()
                             ) -> torch.Tensor:
    """(silu(gate) * up)_e @ weight[e]^T for each expert's consecutive
    rows, with FP8 products, in ``product_dtype(gate)``: what
    ``fp8_grouped_linear(swiglu(gate, up), [weight], ...)`` returns, the
    gating fused into the quantisation of its output where a backward
    follows on FP8 units. weight's FP8 forms are those given
    (``grouped_weight_forms``), or made here."""
    if recipe.emulate or not needs_grad(gate_ci, up_ci, weight_edi):
        (out_cd,) = fp8_grouped_linear(swiglu(gate_ci, up_ci), [weight_edi],
                                       counts_e, recipe,
                                       [forms] if forms else ())
        return out_cd
    dtype = product_dtype(gate_ci)
    with autocast_off(gate_ci.device.type):
        return _FP8GatedDown.apply(
            gate_ci.contiguous(), up_ci.contiguous(), counts_e,
            recipe.power_of_two, dtype, weight_edi, *forms)


def quantises_copies(copies: Copies, weights_eod: Sequence[torch.Tensor],
                     recipe: FP8Recipe) -> bool:
    """Whether ``fp8_copies_grouped_linear`` quantises the copies from
    their tokens (else it makes them first): on FP8 units, with fused
    kernels, where a backward follows."""
    return not recipe.emulate and copies.fused_kernels \
        and needs_grad(copies.x_td, *weights_eod)


def fp8_copies_grouped_linear(copies: Copies,
                              weights_eod: Sequence[torch.Tensor],
                              counts_e: torch.Tensor, recipe: FP8Recipe,
                              forms: Sequence[tuple] = ()
                              ) -> tuple[torch.Tensor, ...]:
    """``fp8_grouped_linear`` of the token copies, which, where a
    backward follows on FP8 units with fused kernels, are quantised
    straight from their tokens and never made in the tokens' dtype."""
    x_td = copies.x_td
    if not quantises_copies(copies, weights_eod, recipe):
        return fp8_grouped_linear(copies.rows(), weights_eod, counts_e,
                                  recipe, forms)
    dtype = product_dtype(x_td)
    with autocast_off(x_td.device.type):
        return _FP8GroupedLinear.apply(
            x_td, copies.copy_tk, copies.sources(), counts_e,
            recipe.power_of_two, dtype, len(weights_eod), *weights_eod,
            *(tensor for form in forms for tensor in form))


def fp8_grouped_linear(x_cd: torch.Tensor,
                       weights_eod: Sequence[torch.Tensor],
                       counts_e: torch.Tensor, recipe: FP8Recipe,
                       forms: Sequence[tuple] = ()
                       ) -> tuple[torch.Tensor, ...]:
    """x_e @ weight[e]^T for each expert's consecutive rows and each of
    weights_eod (x is quantised once for all of them), with FP8
    products, in ``product_dtype(x)``. The weights' FP8 forms are those
    given, one tuple per weight (``grouped_weight_forms``;
    ``coom.fp8.weights`` keeps them between optimizer steps), or made
    here."""
    dtype = product_dtype(x_cd)
    with autocast_off(x_cd.device.type):
        if recipe.emulate:
            return tuple(_emulated(x_cd, weight_eod, counts_e, recipe,
                                   forms[index] if forms else ()).to(dtype)
                         for index, weight_eod in enumerate(weights_eod))
        if needs_grad(x_cd, *weights_eod):
            return _FP8GroupedLinear.apply(
                x_cd, None, None, counts_e, recipe.power_of_two, dtype,
                len(weights_eod), *weights_eod,
                *(tensor for form in forms for tensor in form))
        return _forward(x_cd, counts_e, recipe.power_of_two, dtype,
                        weights_eod, False, forms)[0]
