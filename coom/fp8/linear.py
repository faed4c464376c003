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
the backward in its FP8 form (values and scales), not in bf16.

This file is the emulation: exact quantise-dequantise in float32, which
runs anywhere and is what the tests check the numerics with.

Tensor names end in their shape: m tokens; k input width; n output width.
"""
import torch
from torch import nn

from coom.fp8.scaling import dequantize, fake_quantize, groupings, quantize


def _product(a_mk: torch.Tensor, b_nk: torch.Tensor, a_grouping,
             b_grouping, power_of_two: bool) -> torch.Tensor:
    """a @ b^T with both operands rounded to FP8 along k, in float32."""
    return fake_quantize(a_mk, a_grouping, power_of_two) \
        @ fake_quantize(b_nk, b_grouping, power_of_two).T


class _EmulatedFP8Linear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x_mk, weight_nk, recipe, power_of_two):
        activation, weight = groupings(recipe)
        x_values, x_scales = quantize(x_mk, activation, power_of_two)
        y_mn = dequantize(x_values, x_scales, activation) \
            @ fake_quantize(weight_nk, weight, power_of_two).T
        ctx.save_for_backward(x_values, x_scales, weight_nk)
        ctx.groupings, ctx.power_of_two = (activation, weight), power_of_two
        ctx.x_dtype = x_mk.dtype
        return y_mn

    @staticmethod
    def backward(ctx, dy_mn):
        x_values, x_scales, weight_nk = ctx.saved_tensors
        activation, weight = ctx.groupings
        dy_mn = dy_mn.float()
        dx_mk = _product(dy_mn, weight_nk.float().T, activation, weight,
                         ctx.power_of_two)
        x_mk = dequantize(x_values, x_scales, activation)
        dweight_nk = _product(dy_mn.T, x_mk.T, activation, activation,
                              ctx.power_of_two)
        return (dx_mk.to(ctx.x_dtype), dweight_nk.to(weight_nk.dtype),
                None, None)


def fp8_linear(x: torch.Tensor, weight_nk: torch.Tensor, recipe: str,
               power_of_two: bool = False) -> torch.Tensor:
    """x @ weight^T with FP8 products (emulated in float32); the result
    in autocast's dtype when it is on, else x's."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) \
        if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        y_mn = _EmulatedFP8Linear.apply(x.reshape(-1, x.shape[-1]),
                                        weight_nk, recipe, power_of_two)
    return y_mn.to(dtype).view(*x.shape[:-1], weight_nk.shape[0])


class FP8Linear(nn.Linear):
    """A bias-free nn.Linear whose products run in FP8.

    Args:
        in_features, out_features: as nn.Linear.
        recipe: blockwise, rowwise or tensorwise.
        power_of_two: round scales up to powers of two.
    """

    def __init__(self, in_features: int, out_features: int, recipe: str,
                 power_of_two: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False,
                         device=device, dtype=dtype)
        groupings(recipe)  # refuses unknown recipes
        self.recipe, self.power_of_two = recipe, power_of_two

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.recipe, self.power_of_two)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"
