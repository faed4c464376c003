"""FP8 quantisation of each recipe: error bounds, scale shapes, round
trips."""
import math

import pytest
import torch

from coom.fp8.scaling import (
    E4M3,
    E4M3_MAX,
    RECIPES,
    dequantize,
    groupings,
    quantize,
)

SHAPES = [(5, 123), (130, 1000), (257, 129)]


def _inputs(kind: str, m: int, k: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=generator)
    if kind == "outliers":  # a few entries 1000x larger, as in activations
        index = torch.randint(m * k, (max(m * k // 500, 1),),
                              generator=generator)
        x.view(-1)[index] *= 1000
    return x


def _element_bound(x: torch.Tensor, scale: torch.Tensor,
                   grouping) -> torch.Tensor:
    """Half a unit in the last place: 2^-4 of |x| among E4M3's normal
    numbers (3 mantissa bits), 2^-10 of the scale among its subnormals."""
    m, k = x.shape
    per_entry = dequantize(torch.ones(m, k), scale, grouping)
    return x.abs() * 2 ** -4 + per_entry * 2 ** -10


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("kind", ["random", "outliers"])
@pytest.mark.parametrize("m, k", SHAPES)
@pytest.mark.parametrize("power_of_two", [False, True])
def test_error_within_e4m3_rounding(recipe, kind, m, k, power_of_two):
    x = _inputs(kind, m, k)
    for grouping in groupings(recipe):
        values, scale = quantize(x, grouping, power_of_two)
        assert values.dtype == E4M3 and values.shape == x.shape
        assert scale.dtype == torch.float32
        rows, columns = grouping.sizes(m, k)
        assert scale.shape == (math.ceil(m / rows), math.ceil(k / columns))
        error = (dequantize(values, scale, grouping) - x).abs()
        assert (error <= _element_bound(x, scale, grouping)).all()
        # each group's largest entry is representable: no overflow
        assert values.float().abs().max() <= E4M3_MAX
        if power_of_two:
            assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))


def test_blockwise_shapes_cover_partial_groups():
    activation, weight = groupings("blockwise")
    _, scale = quantize(torch.randn(257, 129), weight)
    assert scale.shape == (3, 2)
    _, scale = quantize(torch.randn(257, 129), activation)
    assert scale.shape == (257, 2)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("power_of_two", [False, True])
def test_scales_round_trip(recipe, power_of_two):
    """Quantising what a quantisation holds gives the same numbers back,
    and the same scales too unless they are powers of two: a group whose
    largest entry rounded down onto a power of two then takes the next
    smaller scale, with twice the values."""
    x = _inputs("outliers", 130, 1000)
    for grouping in groupings(recipe):
        values, scale = quantize(x, grouping, power_of_two)
        held = dequantize(values, scale, grouping)
        again, again_scale = quantize(held, grouping, power_of_two)
        assert torch.equal(dequantize(again, again_scale, grouping), held)
        if not power_of_two:
            assert torch.equal(again_scale, scale)
            assert torch.equal(again.float(), values.float())


def test_fine_grained_scales_isolate_outliers():
    """An outlier spoils only its own tile: blockwise keeps the other
    entries far more accurate than one scale for the tensor."""
    x = _inputs("outliers", 130, 1000)
    errors = {}
    for recipe in RECIPES:
        activation, _ = groupings(recipe)
        values, scale = quantize(x, activation)
        restored = dequantize(values, scale, activation)
        errors[recipe] = ((restored - x).norm() / x.norm()).item()
    assert errors["blockwise"] < errors["rowwise"] < errors["tensorwise"]


def test_zero_groups_get_unit_scale():
    x = torch.zeros(3, 300)
    x[0, :5] = 1.0
    values, scale = quantize(x, groupings("blockwise")[0])
    assert scale[1:].eq(1).all() and scale[0, 1:].eq(1).all()
    assert values[1:].float().eq(0).all()


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="unknown FP8 recipe"):
        groupings("mxfp8")
