"""Grouped blockwise FP8 products against a float64 reference made from
the dequantised operands, group by group (interpreted on CPU).

On a GPU, Hopper's FP8 tensor cores sum each 128 products with about 14
bits of precision before the kernels add them into float32 (DeepSeek-V3,
section 3.3.2): measured 1.1-1.4e-4 relative on an H100, as cuBLAS's
(tests/fp8/test_linear.py), so float32 outputs are held to 2^-11 there
and to float32's bound in the interpreter, which sums in float32."""
import pytest
import torch

from coom.fp8.grouped_gemm import (
    grouped_fp8_mm,
    grouped_fp8_mm_wgrad,
)
from coom.fp8.scaling import (
    TILE,
    Grouping,
    dequantize,
    group_tile_starts,
    quantize,
    quantize_transposed,
)
from tests.kernels import BOUND, DEVICE, relative_error

ROW_TILE, WEIGHT_BLOCK = Grouping(1, TILE), Grouping(TILE, TILE)
FP8_BOUND = BOUND | ({torch.float32: 2 ** -11} if DEVICE == "cuda" else {})
# Group starts 0, 0, 130, 135 (not multiples of 16) and 0, 0, 160, 192.
COUNTS = [[0, 130, 5, 61], [0, 160, 32, 61]]


def _rows(t, k, generator):
    """Rows whose magnitudes vary, so that the scales matter."""
    return (torch.randn(t, k, generator=generator)
            * torch.rand(t, 1, generator=generator).exp2() * 4)


def _operands(counts, k, n, seed):
    """Quantised a (t, k) and b (e, n, k), and the dequantised float64 a
    and b."""
    generator = torch.Generator().manual_seed(seed)
    a_tk = _rows(sum(counts), k, generator)
    b_enk = torch.randn(len(counts), n, k, generator=generator) / k ** 0.5
    a_values, a_scales = quantize(a_tk, ROW_TILE)
    quantized = [quantize(b_nk, WEIGHT_BLOCK) for b_nk in b_enk]
    b_values = torch.stack([values for values, _ in quantized])
    b_scales = torch.stack([scales for _, scales in quantized])
    a_ref = dequantize(a_values, a_scales, ROW_TILE).double()
    b_ref = torch.stack([dequantize(values, scales, WEIGHT_BLOCK)
                         for values, scales in quantized]).double()
    # Scales in other layouts than quantize's, as callers pass them.
    operands = (a_values, a_scales.T.contiguous().T, b_values,
                b_scales.transpose(1, 2).contiguous().transpose(1, 2))
    return [x.to(DEVICE) for x in operands], a_ref, b_ref


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", COUNTS + [[61]])
@pytest.mark.parametrize("k, n", [(208, 136), (256, 128)])
def test_grouped_fp8_mm_against_float64(counts, k, n, out_dtype):
    operands, a_ref, b_ref = _operands(counts, k, n, seed=k + n)
    counts_e = torch.tensor(counts, device=DEVICE)
    out = grouped_fp8_mm(*operands, counts_e, out_dtype=out_dtype)
    assert out.shape == (sum(counts), n) and out.dtype == out_dtype
    rows = 0
    for count, b_nk in zip(counts, b_ref):
        if count:
            ref = a_ref[rows:rows + count] @ b_nk.T
            assert relative_error(out[rows:rows + count].cpu(),
                                  ref) < FP8_BOUND[out_dtype]
        rows += count


def test_grouped_fp8_mm_refuses_rows_tma_cannot_load():
    """TMA loads rows of a multiple of 16 bytes, from 16-byte
    boundaries."""
    operands, _, _ = _operands([3, 5], 200, 64, seed=0)
    counts_e = torch.tensor([3, 5], device=DEVICE)
    with pytest.raises(ValueError, match="a_values_tk .* 200"):
        grouped_fp8_mm(*operands, counts_e)
    a_values, a_scales, b_values, b_scales = _operands([3, 5], 256, 64,
                                                       seed=0)[0]
    shifted = a_values.new_empty(a_values.numel() + 8)[8:]
    shifted.copy_(a_values.flatten())
    with pytest.raises(ValueError, match="16-byte boundary"):
        grouped_fp8_mm(shifted.view(a_values.shape), a_scales, b_values,
                       b_scales, counts_e)


def test_grouped_fp8_mm_of_no_rows():
    operands, _, _ = _operands([0, 0], 128, 64, seed=0)
    counts_e = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    assert grouped_fp8_mm(*operands, counts_e).shape == (0, 64)


def _wgrad_operands(counts, n, k, seed):
    """Quantised dy^T (n, c) and x^T (k, c) in group tiles, tile-padded,
    scales of strides (1, n) and (1, k), and each group's dequantised
    float64 dy_e^T and x_e^T."""
    generator = torch.Generator().manual_seed(seed)
    t = sum(counts)
    dy_tn, x_tk = _rows(t, n, generator), _rows(t, k, generator)
    counts_e = torch.tensor(counts)
    starts = group_tile_starts(counts_e).tolist()
    operands, refs = [], []
    for x in (dy_tn, x_tk):
        values, scales = quantize_transposed(x, counts_e)
        groups = []
        for count, start in zip(counts, starts):
            tiles = scales[:, start:start + -(-count // TILE)]
            columns = values[:, start * TILE:start * TILE + count]
            groups.append(dequantize(columns, tiles, ROW_TILE).double())
        operands += [values, scales.T.contiguous().T]
        refs.append(groups)
    return [x.to(DEVICE) for x in operands], refs


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", COUNTS + [[0, 0, 0], [300, 0]])
@pytest.mark.parametrize("n, k", [(136, 200), (128, 64)])
def test_grouped_fp8_mm_wgrad_against_float64(counts, n, k, out_dtype):
    """Also exactly zero for groups without rows."""
    operands, (dy_refs, x_refs) = _wgrad_operands(counts, n, k, seed=n + k)
    counts_e = torch.tensor(counts, device=DEVICE)
    out = grouped_fp8_mm_wgrad(*operands, counts_e, out_dtype=out_dtype)
    assert out.shape == (len(counts), n, k) and out.dtype == out_dtype
    for count, out_nk, dy_nt, x_kt in zip(counts, out.cpu(), dy_refs,
                                          x_refs):
        if count:
            error = relative_error(out_nk, dy_nt @ x_kt.T)
            assert error < FP8_BOUND[out_dtype]
        else:
            assert torch.equal(out_nk, torch.zeros_like(out_nk))


def test_grouped_fp8_mm_wgrad_refuses_unpadded_operands():
    operands, _ = _wgrad_operands([130, 5], 64, 64, seed=0)
    a_values, a_scales, b_values, b_scales = operands
    counts_e = torch.tensor([130, 5], device=DEVICE)
    with pytest.raises(ValueError, match="tile-padded"):
        grouped_fp8_mm_wgrad(a_values[:, :135].contiguous(), a_scales,
                             b_values[:, :135].contiguous(), b_scales,
                             counts_e)
