"""Tokens rounded to FP8 for their journey to the experts
(``coom.fp8.dispatch``): the rounding is the blockwise recipe's 1 x 128
tiles, in the rows' dtype, the gradient passes through, and the rows
travel as bytes and tile scales."""
import pytest
import torch

from coom.fp8.dispatch import FP8Rows
from coom.fp8.scaling import TILE, Grouping, fake_quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("power_of_two", [False, True])
def test_rows_round_to_their_tiles_and_pass_the_gradient(dtype,
                                                         power_of_two):
    torch.manual_seed(0)
    x_cd = (torch.randn(37, 300) * torch.logspace(-3, 3, 37)[:, None]
            ).to(dtype).requires_grad_()
    rounded = FP8Rows(power_of_two).round(x_cd)
    expected = fake_quantize(x_cd.detach(), Grouping(1, TILE),
                             power_of_two).to(dtype)
    assert rounded.dtype == dtype
    assert torch.equal(rounded, expected)
    assert not torch.equal(rounded, x_cd)
    gradient = torch.randn_like(rounded)
    rounded.backward(gradient)
    assert torch.equal(x_cd.grad, gradient)


def test_rows_travel_as_bytes_and_tile_scales():
    """300 columns: three tiles, the last one partial; about half of
    bf16's bytes."""
    x_cd = torch.randn(5, 300, dtype=torch.bfloat16)
    values, scales = FP8Rows().quantize(x_cd)
    assert values.dtype == torch.uint8 and values.shape == (5, 300)
    assert scales.dtype == torch.float32 and scales.shape == (5, 3)
    assert values.is_contiguous() and scales.is_contiguous()
    sent = values.numel() + 4 * scales.numel()
    assert sent < 0.55 * 2 * x_cd.numel()
    assert torch.equal(FP8Rows.expand(values, scales, torch.bfloat16),
                       FP8Rows().round(x_cd))
