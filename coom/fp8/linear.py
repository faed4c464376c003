"""The FP8 linear layer: all three matrix products of a linear in FP8.

With y = x W^T, the forward (x, W), the input gradient dx = dy W and the
weight gradient dW = dy^T x each multiply two FP8 operands, scaled by the
recipe (``coom.fp8.scaling``), summing in float32:

| product | left operand | right operand |
|---|---|---|
| y = x W^T | x, activation groups | W, weight groups |
| dx = dy W | dy, activation groups | W^T, weight groups |
| dW = dy^T x | dy^T, activation groups | x^T, activation groups |

so under ``blockwise`` the weight gradient uses 1 x 128 tiles along the
tokens on both operands, as DeepSeek-V3 describes. The forward keeps x for
the backward in FP8 (values and scales), not in bf16: as the x^T operand
of the weight gradient, quantised from x itself (DeepSeek-V3 re-quantises
its FP8 x, rounding twice).

Two implementations: on FP8 matrix units (``torch._scaled_mm``, with
COOM's Triton quantisation for ``blockwise``, which writes x and the
copy of x^T the weight gradient needs in one pass), and the emulation,
exact quantise-dequantise in float32, which runs anywhere and is what
the CPU tests check the numerics with.

Tensor names end in their shape: m tokens; k input width; n output width.
"""
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from coom.fp8 import ops
from coom.fp8.scaling import (
    TILE,
    dequantize,
    fake_quantize,
    groupings,
    quantize,
)
from coom.fp8.weights import KeptForms
from coom.kernels.autocast import autocast_off, product_dtype
from coom.kernels.swiglu import swiglu, swiglu_backward


@dataclass(frozen=True)
class FP8Recipe:
    """How a layer's products run in FP8.

    Args:
        scaling: blockwise, rowwise or tensorwise (``coom.fp8.scaling``).
        power_of_two: round scales up to powers of two.
        emulate: exact quantise-dequantise in float32 instead of FP8
            matrix units.
    """

    scaling: str
    power_of_two: bool = False
    emulate: bool = False

    def __post_init__(self):
        groupings(self.scaling)  # refuses unknown recipes


def emulated_weight_forms(weight_nk: torch.Tensor, scaling: str,
                          power_of_two: bool) -> tuple[torch.Tensor, ...]:
    """What the emulated products multiply by in place of W: W and W^T,
    each rounded to FP8 in the recipe's weight grouping, in float32,
    contiguous (a product's rounding can depend on its operands'
    layout, and kept forms of several experts are stacked)."""
    _, weight = groupings(scaling)
    return (fake_quantize(weight_nk, weight, power_of_two),
            fake_quantize(weight_nk.float().T.contiguous(), weight,
                          power_of_two))


class _EmulatedFP8Linear(torch.autograd.Function):
    """x W^T with FP8 products, emulated: W's rounded forms are those
    given (``emulated_weight_forms``, kept between optimizer steps), or
    made here."""

    @staticmethod
    def forward(ctx, x_mk, weight_nk, recipe, power_of_two, *forms):
        activation, _ = groupings(recipe)
        w_nk, w_t_kn = forms or emulated_weight_forms(weight_nk, recipe,
                                                      power_of_two)
        y_mn = fake_quantize(x_mk, activation, power_of_two) @ w_nk.T
        x_values_km, x_scales = quantize(x_mk.T, activation, power_of_two)
        ctx.save_for_backward(x_values_km, x_scales, w_t_kn)
        ctx.activation, ctx.power_of_two = activation, power_of_two
        ctx.dtypes = x_mk.dtype, weight_nk.dtype
        ctx.forms = len(forms)
        return y_mn

    @staticmethod
    def backward(ctx, dy_mn):
        x_values_km, x_scales, w_t_kn = ctx.saved_tensors
        activation = ctx.activation
        dy_mn = dy_mn.float()
        dx_mk = fake_quantize(dy_mn, activation, ctx.power_of_two) \
            @ w_t_kn.T
        dweight_nk = fake_quantize(dy_mn.T, activation, ctx.power_of_two) \
            @ dequantize(x_values_km, x_scales, activation).T
        x_dtype, weight_dtype = ctx.dtypes
        return (dx_mk.to(x_dtype), dweight_nk.to(weight_dtype), None, None,
                *[None] * ctx.forms)


def _quantize_activation(x_mk: torch.Tensor, scaling: str,
                         power_of_two: bool, transpose: bool):
    """((values, scales) of x, (values, scales) of x^T), each in the
    recipe's activation grouping along its rows; x^T's are None without
    transpose."""
    if scaling == "blockwise":
        if not transpose:
            return ops.quantize_rows(x_mk, power_of_two), None
        values, scales, values_t, scales_t = \
            ops.quantize_rows_and_transpose(x_mk, power_of_two)
        return (values, scales), (values_t, scales_t)
    activation, _ = groupings(scaling)
    return (quantize(x_mk, activation, power_of_two),
            quantize(x_mk.T, activation, power_of_two) if transpose
            else None)


def _quantize_weight(weight_nk: torch.Tensor, scaling: str,
                     power_of_two: bool, transpose: bool):
    """((values, scales) of W, (values, scales) of W^T) in the recipe's
    weight grouping; W^T's are None without transpose."""
    if scaling == "blockwise":
        if not transpose:
            return ops.quantize_blocks(weight_nk, power_of_two), None
        values, scales, values_t = ops.quantize_blocks_and_transpose(
            weight_nk, power_of_two)
        return (values, scales), (values_t, scales.transpose(-2, -1))
    _, weight = groupings(scaling)
    return (quantize(weight_nk, weight, power_of_two),
            quantize(weight_nk.T, weight, power_of_two) if transpose
            else None)


def _scales_for_scaled_mm(values: torch.Tensor,
                          scales: torch.Tensor) -> torch.Tensor:
    """An operand's scales laid out as ``torch._scaled_mm`` checks them:
    scales of rows or 1 x 128 tiles (one row of scales per row of values)
    outer-dim-major, 128 x 128 block scales row-major."""
    if scales.shape[0] == values.shape[0]:
        return scales.t().contiguous().t()
    return scales.contiguous()


# cuBLAS reads 128 x 128 block scales with rows padded to a multiple of 4
# (newer torch checks for it; torch 2.11 does not, and the product then
# reads past each row).
_BLOCK_SCALE_ROW_ALIGNMENT = 4


def _padded_tiles(k: int, block_scaled: bool) -> int:
    """128-column tiles of k for cuBLAS's blockwise scaling: whole tiles,
    a multiple of 4 of them where an operand has 128 x 128 blocks."""
    tiles = math.ceil(k / TILE)
    if block_scaled:
        tiles = math.ceil(tiles / _BLOCK_SCALE_ROW_ALIGNMENT) \
            * _BLOCK_SCALE_ROW_ALIGNMENT
    return tiles


def _pad_tiles(values: torch.Tensor, scales: torch.Tensor,
               tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An operand whose rows run along k, zero-padded to that many
    128-column tiles; the added tiles get scale 1."""
    padded = values.new_zeros(values.shape[0], tiles * TILE)
    padded[:, :values.shape[1]] = values
    ones = scales.new_ones(scales.shape[0], tiles - scales.shape[1])
    return padded, torch.cat([scales, ones], dim=1)


def _scaled_product(a, b, out_dtype: torch.dtype,
                    blockwise: bool) -> torch.Tensor:
    """a @ b^T on FP8 matrix units, of two (values, scales) operands
    whose rows run along k. ``torch._scaled_mm`` checks B's scales
    transposed against B^T, so both operands' scales take one layout.
    Blockwise, k is zero-padded to the tiles cuBLAS needs
    (``_padded_tiles``)."""
    (a_values_mk, a_scales), (b_values_nk, b_scales) = a, b
    a_values_mk, b_values_nk = a_values_mk.contiguous(), \
        b_values_nk.contiguous()
    if blockwise:
        block_scaled = b_scales.shape[0] != b_values_nk.shape[0]
        tiles = _padded_tiles(a_values_mk.shape[1], block_scaled)
        if tiles * TILE != a_values_mk.shape[1]:
            a_values_mk, a_scales = _pad_tiles(a_values_mk, a_scales, tiles)
            b_values_nk, b_scales = _pad_tiles(b_values_nk, b_scales, tiles)
    return ops.scaled_mm(
        a_values_mk, b_values_nk.t(),
        _scales_for_scaled_mm(a_values_mk, a_scales),
        _scales_for_scaled_mm(b_values_nk, b_scales).t(), out_dtype)


def weight_forms(weight_nk: torch.Tensor, scaling: str,
                 power_of_two: bool) -> tuple[torch.Tensor, ...]:
    """What the FP8 units multiply by in place of W: the values and
    scales of W and of W^T in the recipe's weight grouping."""
    (values, scales), (values_t, scales_t) = _quantize_weight(
        weight_nk, scaling, power_of_two, transpose=True)
    return values, scales, values_t, scales_t


def _forward(x_mk: torch.Tensor, scaling: str, power_of_two: bool,
             out_dtype: torch.dtype, weights_nk: Sequence[torch.Tensor],
             backward: bool, forms: Sequence[tuple] = ()):
    """x @ weight^T for each weight on FP8 matrix units, x quantised once:
    (outputs, the FP8 x^T and each W^T that the backward multiplies).
    Without backward, those are not made and the list is empty. The
    weights' FP8 forms are those given (``weight_forms``, one tuple per
    weight), or made here."""
    blockwise = scaling == "blockwise"
    x_rows, x_columns = _quantize_activation(x_mk, scaling, power_of_two,
                                             backward)
    outputs, columns = [], list(x_columns) if backward else []
    for index, weight_nk in enumerate(weights_nk):
        if forms:
            values, scales, values_t, scales_t = forms[index]
            weight_rows, weight_columns = (values, scales), \
                (values_t, scales_t)
        else:
            weight_rows, weight_columns = _quantize_weight(
                weight_nk, scaling, power_of_two, backward)
        if backward:
            columns += weight_columns
        outputs.append(_scaled_product(x_rows, weight_rows, out_dtype,
                                       blockwise))
    return tuple(outputs), columns


class _FP8Linear(torch.autograd.Function):
    """The three products on FP8 matrix units (``torch._scaled_mm``), of
    one x with one or more weights: x is quantised once for all of them
    (a feed-forward's gate and up products), and its FP8 x^T kept once
    for their weight gradients. The recipe comes as plain values (its
    scaling and power_of_two), not as the FP8Recipe: torch 2.11's
    tracing of the Function under no_grad failed on the dataclass. The
    tensors are the count weights, then, if kept, their FP8 forms
    (``weight_forms``), four for each, flat."""

    @staticmethod
    def forward(ctx, x_mk, scaling, power_of_two, out_dtype, count,
                *tensors):
        weights_nk, kept = tensors[:count], tensors[count:]
        forms = [kept[index:index + 4] for index in range(0, len(kept), 4)]
        outputs, columns = _forward(x_mk, scaling, power_of_two, out_dtype,
                                    weights_nk, True, forms)
        ctx.save_for_backward(*columns)
        ctx.scaling, ctx.power_of_two = scaling, power_of_two
        ctx.x_dtype, ctx.kept = x_mk.dtype, len(kept)
        return outputs

    @staticmethod
    def backward(ctx, *dys_mn):
        x_values_km, x_scales, *weights_columns = ctx.saved_tensors
        blockwise = ctx.scaling == "blockwise"
        dx_mk, dweights_nk = None, []
        for dy_mn, weight_values_kn, weight_scales in zip(
                dys_mn, weights_columns[::2], weights_columns[1::2]):
            dy_rows, dy_columns = _quantize_activation(
                dy_mn.contiguous(), ctx.scaling, ctx.power_of_two,
                transpose=True)
            dx = _scaled_product(dy_rows, (weight_values_kn, weight_scales),
                                 ctx.x_dtype, blockwise)
            dx_mk = dx if dx_mk is None else dx_mk + dx
            dweights_nk.append(_scaled_product(
                dy_columns, (x_values_km, x_scales), torch.float32,
                blockwise))
        return (dx_mk, None, None, None, None, *dweights_nk,
                *[None] * ctx.kept)


class _FP8GatedLinear(torch.autograd.Function):
    """The down product of a feed-forward's gated units, y = (silu(gate)
    * up) W^T, on FP8 matrix units, blockwise, with the gating fused into
    the quantisation of its output (``ops.swiglu_rows_and_transpose``):
    the gated units are written only as the FP8 rows the product reads
    and the FP8 columns its weight gradient reads. The backward is that
    of the gating followed by ``_FP8Linear``, op for op. The tensors
    after the weight are its kept FP8 forms (``weight_forms``), if
    any."""

    @staticmethod
    def forward(ctx, gate_mk, up_mk, power_of_two, out_dtype, weight_nk,
                *forms):
        values, scales, values_t, scales_t = ops.swiglu_rows_and_transpose(
            gate_mk, up_mk, power_of_two)
        weight_rows, weight_columns = (forms[:2], forms[2:]) if forms \
            else _quantize_weight(weight_nk, "blockwise", power_of_two,
                                  transpose=True)
        ctx.save_for_backward(gate_mk, up_mk, values_t, scales_t,
                              *weight_columns)
        ctx.power_of_two, ctx.kept = power_of_two, len(forms)
        return _scaled_product((values, scales), weight_rows, out_dtype,
                               blockwise=True)

    @staticmethod
    def backward(ctx, dy_mn):
        (gate_mk, up_mk, h_values_km, h_scales, weight_values_kn,
         weight_scales) = ctx.saved_tensors
        dy_rows, dy_columns = _quantize_activation(
            dy_mn.contiguous(), "blockwise", ctx.power_of_two,
            transpose=True)
        dh_mk = _scaled_product(dy_rows, (weight_values_kn, weight_scales),
                                gate_mk.dtype, blockwise=True)
        dgate_mk, dup_mk = swiglu_backward(dh_mk, gate_mk, up_mk)
        dweight_nk = _scaled_product(dy_columns, (h_values_km, h_scales),
                                     torch.float32, blockwise=True)
        return (dgate_mk, dup_mk, None, None, dweight_nk,
                *[None] * ctx.kept)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records a product of these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fp8_linears(x: torch.Tensor, weights_nk: Sequence[torch.Tensor],
                recipe: FP8Recipe, forms: Sequence[tuple] = ()
                ) -> tuple[torch.Tensor, ...]:
    """x @ weight^T for each of weights_nk with FP8 products, in
    ``product_dtype(x)``. On FP8 units x is quantised once for all of
    them; emulated, once per weight (the same values). The weights' FP8
    forms are those given, one tuple per weight (``weight_forms``, or
    ``emulated_weight_forms`` emulated; ``coom.fp8.weights`` keeps them
    between optimizer steps), or made here."""
    dtype, x_mk = product_dtype(x), x.reshape(-1, x.shape[-1])
    with autocast_off(x.device.type):
        if recipe.emulate:
            ys_mn = [_EmulatedFP8Linear.apply(
                x_mk, weight_nk, recipe.scaling, recipe.power_of_two,
                *(forms[index] if forms else ()))
                for index, weight_nk in enumerate(weights_nk)]
        elif needs_grad(x_mk, *weights_nk):
            ys_mn = _FP8Linear.apply(
                x_mk, recipe.scaling, recipe.power_of_two, dtype,
                len(weights_nk), *weights_nk,
                *(tensor for form in forms for tensor in form))
        else:
            # Without the autograd.Function: nothing is made or kept for
            # a backward, and torch.compile's no-grad handling of one is
            # never involved (on torch 2.11 it failed, and the whole
            # block then fell back to eager for the rest of the run).
            ys_mn, _ = _forward(x_mk, recipe.scaling, recipe.power_of_two,
                                dtype, weights_nk, False, forms)
    return tuple(y_mn.to(dtype).view(*x.shape[:-1], weight_nk.shape[0])
                 for y_mn, weight_nk in zip(ys_mn, weights_nk))


def fp8_gated_linear(gate: torch.Tensor, up: torch.Tensor,
                     weight_nk: torch.Tensor, recipe: FP8Recipe,
                     forms: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """silu(gate) * up @ weight^T with FP8 products, in
    ``product_dtype(gate)``: what ``fp8_linear(swiglu(gate, up), weight,
    recipe)`` returns, the gating fused into the quantisation of its
    output where a backward follows on FP8 units with blockwise scaling.
    weight's FP8 forms are those given (``weight_forms``), or made
    here."""
    if recipe.emulate or recipe.scaling != "blockwise" \
            or not needs_grad(gate, up, weight_nk):
        return fp8_linears(swiglu(gate, up), [weight_nk], recipe,
                           [forms] if forms else ())[0]
    dtype = product_dtype(gate)
    with autocast_off(gate.device.type):
        y_mn = _FP8GatedLinear.apply(
            gate.reshape(-1, gate.shape[-1]).contiguous(),
            up.reshape(-1, up.shape[-1]).contiguous(), recipe.power_of_two,
            dtype, weight_nk, *forms)
    return y_mn.to(dtype).view(*gate.shape[:-1], weight_nk.shape[0])


def fp8_linear(x: torch.Tensor, weight_nk: torch.Tensor,
               recipe: FP8Recipe) -> torch.Tensor:
    """x @ weight^T with FP8 products, in ``product_dtype(x)``."""
    return fp8_linears(x, [weight_nk], recipe)[0]


class FP8Linear(nn.Linear):
    """A bias-free nn.Linear whose products run in FP8, with its weight's
    FP8 forms kept between optimizer steps (``coom.fp8.weights``).

    Args:
        in_features, out_features: as nn.Linear.
        recipe: how the products run in FP8.
    """

    def __init__(self, in_features: int, out_features: int,
                 recipe: FP8Recipe, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False,
                         device=device, dtype=dtype)
        self.recipe = recipe
        make = emulated_weight_forms if recipe.emulate else weight_forms
        self.kept = KeptForms(partial(make, scaling=recipe.scaling,
                                      power_of_two=recipe.power_of_two))

    def refresh_kept(self) -> bool:
        """Make the weight's kept forms again if it changed."""
        return self.kept.refresh(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        forms = self.kept.forms()
        return fp8_linears(x, [self.weight], self.recipe,
                           [forms] if forms else ())[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.recipe}"
