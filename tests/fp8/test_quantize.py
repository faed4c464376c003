"""Triton FP8 quantisation against coom/fp8/scaling.py's reference, bit
for bit (interpreted on CPU); and the quantisation with SwiGLU's gating
fused in, or of copies read where they are, against the quantisation of
the gating kernel's output or of the copies made.
"""
import pytest
import torch

from coom.fp8.quantize import (
    gathered_rows_and_transpose,
    quantize_blocks,
    quantize_rows,
    quantize_rows_and_transpose,
    swiglu_rows_and_transpose,
)
from coom.fp8.scaling import (
    E4M3,
    TILE,
    Grouping,
    max_group_tiles,
    quantize,
    quantize_transposed,
)
from coom.kernels.swiglu import swiglu
from tests.kernels import DEVICE

SHAPES = [(200, 300), (1, 5), (130, 128), (257, 129)]
ROWS, BLOCKS = Grouping(1, 128), Grouping(128, 128)
power_of_two_or_not = pytest.mark.parametrize("power_of_two", [False, True])
dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])


def _matrix(shape, dtype, seed=0):
    """Normal entries, a few outliers (x 1000) and, where a second tile
    exists both ways, a zero block: zero groups in every grouping."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 3
    outliers = torch.randint(0, x.numel(), (3,), generator=generator)
    x.view(-1)[outliers] *= 1e3
    x[..., 128:, 128:] = 0
    return x.to(device=DEVICE, dtype=dtype)


def _assert_same(ours, reference):
    """Equal E4M3 bit patterns and equal float32 scales."""
    (values, scales), (ref_values, ref_scales) = ours, reference
    assert values.dtype == E4M3 and values.is_contiguous()
    assert torch.equal(values.view(torch.uint8),
                       ref_values.to(DEVICE).view(torch.uint8))
    assert scales.dtype == torch.float32
    assert torch.equal(scales, ref_scales.to(DEVICE))


@power_of_two_or_not
@dtypes
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_rows_matches_reference(shape, dtype, power_of_two):
    x_mk = _matrix(shape, dtype)
    values_mk, scales_mh = quantize_rows(x_mk, power_of_two)
    _assert_same((values_mk, scales_mh),
                 quantize(x_mk, ROWS, power_of_two))
    assert scales_mh.stride() == (1, shape[0])


@power_of_two_or_not
@dtypes
@pytest.mark.parametrize("shape", SHAPES)
def test_rows_and_transpose_match_reference(shape, dtype, power_of_two):
    x_mk = _matrix(shape, dtype)
    rows, transposed = quantize_rows_and_transpose(x_mk, power_of_two)
    _assert_same(rows, quantize(x_mk, ROWS, power_of_two))
    _assert_same(transposed, quantize_transposed(x_mk, None, power_of_two))
    assert rows[1].stride() == (1, shape[0])
    assert transposed[1].stride() == (1, shape[1])


def test_rows_and_transpose_of_a_strided_input():
    x_mk = _matrix((130, 257), torch.bfloat16).T
    rows, transposed = quantize_rows_and_transpose(x_mk)
    _assert_same(rows, quantize(x_mk, ROWS))
    _assert_same(transposed, quantize_transposed(x_mk))


@power_of_two_or_not
@dtypes
@pytest.mark.parametrize("counts", [[0, 130, 0, 40, 130], [128, 0, 172],
                                    [300], [0, 0, 300, 0]])
def test_grouped_transpose_matches_reference(counts, dtype, power_of_two):
    x_mk = _matrix((300, 130), dtype)
    counts_e = torch.tensor(counts, device=DEVICE, dtype=torch.int32)
    rows, transposed = quantize_rows_and_transpose(x_mk, power_of_two,
                                                   counts_e)
    _assert_same(rows, quantize(x_mk, ROWS, power_of_two))
    _assert_same(transposed,
                 quantize_transposed(x_mk, counts_e, power_of_two))
    tiles = max_group_tiles(300, len(counts))
    assert transposed[0].shape == (130, tiles * TILE)
    assert transposed[1].shape == (130, tiles)
    assert transposed[1].stride() == (1, 130)


def test_grouped_tiles_by_hand():
    """Groups of 0, 3, 0 and 2 rows: group 1 fills tile 0 (columns 0 to
    2 of x^T), group 3 tile 1 (columns 128 and 129), tiles 2 to 4 are
    unused (scale 1); all other columns are zeros. Every entry is exact
    in E4M3 at its scale, so dequantising gives x back exactly."""
    x_mk = torch.tensor([[448., -224, 7, 0], [-3, 16, -112, 0],
                         [1, 2, 56, 0], [896, 14, -28, 8],
                         [-8, -7, 7, -896]], device=DEVICE)
    counts_e = torch.tensor([0, 3, 0, 2], device=DEVICE)
    (values_mk, scales_mh), (values_kc, scales_kj) = (
        quantize_rows_and_transpose(x_mk, counts_e=counts_e))
    ones = [1.0, 1.0, 1.0]
    expected_kj = torch.tensor([[1, 2, *ones], [1 / 2, 1 / 32, *ones],
                                [1 / 4, 1 / 16, *ones], [1, 2, *ones]],
                               device=DEVICE)
    assert torch.equal(scales_kj, expected_kj)
    assert values_kc.shape == (4, 5 * TILE)
    assert torch.equal(values_kc[:, :3].float() * scales_kj[:, :1],
                       x_mk[:3].T)
    assert torch.equal(values_kc[:, 128:130].float() * scales_kj[:, 1:2],
                       x_mk[3:].T)
    padding = torch.ones(4, 5 * TILE, dtype=torch.bool, device=DEVICE)
    padding[:, :3] = padding[:, 128:130] = False
    assert not values_kc.view(torch.uint8)[padding].any()  # +0, bitwise
    assert torch.equal(scales_mh[:, 0],
                       torch.tensor([1, 1 / 4, 1 / 8, 2, 2], device=DEVICE))
    assert torch.equal(values_mk.float() * scales_mh, x_mk)


def test_rounding_to_nearest_even_and_subnormals():
    """With amax 448 the scale is 1, so the values are x rounded: ties
    to even, carries into the next power of two, E4M3's subnormals, and
    the sign of zero."""
    row = [448.0, 1.0625, 1.1875, 15.9, 124.3, 247.9, 248.0, 440.0,
           2 ** -10, 3 * 2 ** -10, 5 * 2 ** -10, 2 ** -12, -0.0, -1e-9]
    x_mk = torch.tensor([row, [-v for v in row]], device=DEVICE)
    values_mk, scales_mh = quantize_rows(x_mk)
    assert torch.equal(scales_mh, torch.ones(2, 1, device=DEVICE))
    assert torch.equal(values_mk.view(torch.uint8),
                       x_mk.to(E4M3).view(torch.uint8))


@power_of_two_or_not
@dtypes
@pytest.mark.parametrize("shape", [(200, 300), (1, 5), (2, 257, 129),
                                   (3, 130, 128)])
def test_quantize_blocks_matches_reference(shape, dtype, power_of_two):
    w = _matrix(shape, dtype)
    values, scales, values_t = quantize_blocks(w, power_of_two,
                                               transpose=True)
    for index in range(w.numel() // (shape[-2] * shape[-1])):
        matrix = w.view(-1, *shape[-2:])[index]
        ours = (values.view(-1, *shape[-2:])[index],
                scales.view(-1, *scales.shape[-2:])[index])
        _assert_same(ours, quantize(matrix, BLOCKS, power_of_two))
    assert values.shape == values_t.transpose(-2, -1).shape == shape
    assert values_t.is_contiguous() and scales.is_contiguous()
    assert torch.equal(values_t.view(torch.uint8),
                       values.transpose(-2, -1).view(torch.uint8))
    assert len(quantize_blocks(w, power_of_two)) == 2


@dtypes
@pytest.mark.parametrize("shape", [(1536, 1024), (384, 2304)])
def test_model_sized_matrices(shape, dtype):
    """Whole tiles at the `small` preset's sizes, where the GPU kernels
    once stored scrambled transposed copies of float32 inputs."""
    x = _matrix(shape, dtype)
    rows, transposed = quantize_rows_and_transpose(x)
    _assert_same(rows, quantize(x, ROWS))
    _assert_same(transposed, quantize_transposed(x))
    values, scales, values_t = quantize_blocks(x, transpose=True)
    _assert_same((values, scales), quantize(x, BLOCKS))
    assert torch.equal(values_t.view(torch.uint8),
                       values.T.contiguous().view(torch.uint8))


def test_empty_inputs():
    x_mk = torch.zeros(0, 130, device=DEVICE)
    _assert_same(quantize_rows(x_mk), quantize(x_mk, ROWS))
    rows, transposed = quantize_rows_and_transpose(x_mk)
    _assert_same(rows, quantize(x_mk, ROWS))
    _assert_same(transposed, quantize_transposed(x_mk))
    counts_e = torch.zeros(3, device=DEVICE, dtype=torch.int64)
    _, transposed = quantize_rows_and_transpose(x_mk, counts_e=counts_e)
    _assert_same(transposed, quantize_transposed(x_mk, counts_e))
    assert transposed[0].shape == (130, 3 * TILE)
    assert not transposed[0].view(torch.uint8).any()
    for shape in [(0, 5), (2, 0, 130), (0, 5, 7)]:
        values, scales, values_t = quantize_blocks(
            torch.zeros(shape, device=DEVICE), transpose=True)
        assert values.shape == shape
        assert values_t.shape == (*shape[:-2], shape[-1], shape[-2])


@pytest.fixture
def swiglu_kernel():
    """coom::swiglu through its Triton kernel (interpreted on CPU, where
    the op's own CPU kernel is the plain-PyTorch reference), as the
    fused quantisation computes it."""
    with swiglu.set_kernel_enabled("cpu", False):
        yield swiglu


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@power_of_two_or_not
@dtypes
@pytest.mark.parametrize("counts", [None, [0, 130, 0, 40, 130]])
def test_gated_rows_and_transpose_quantise_swiglu(swiglu_kernel, counts,
                                                  dtype, power_of_two):
    """The gating fused into the quantisation gives the quantisation of
    the gating's own output, bit for bit, grouped or not."""
    gate, up = _matrix((300, 130), dtype, seed=1), \
        _matrix((300, 130), dtype, seed=2)
    counts_e = None if counts is None \
        else torch.tensor(counts, device=DEVICE, dtype=torch.int32)
    rows, transposed = swiglu_rows_and_transpose(gate, up, power_of_two,
                                                 counts_e)
    reference = quantize_rows_and_transpose(swiglu_kernel(gate, up),
                                            power_of_two, counts_e)
    _assert_same(rows, reference[0])
    _assert_same(transposed, reference[1])


def test_gate_and_up_must_share_a_layout():
    gate = _matrix((200, 300), torch.float32)
    with pytest.raises(ValueError, match="strides"):
        swiglu_rows_and_transpose(gate, gate.T.contiguous().T)


@power_of_two_or_not
@dtypes
@pytest.mark.parametrize("counts", [None, [0, 130, 0, 40, 130]])
def test_gathered_rows_quantise_the_copies(counts, dtype, power_of_two):
    """Copies of the rows of x read where they are give the
    quantisation of the copies made, bit for bit."""
    x_td = _matrix((120, 130), dtype)
    generator = torch.Generator().manual_seed(7)
    sources_c = torch.randint(0, 120, (300,), generator=generator).to(
        DEVICE)
    counts_e = None if counts is None \
        else torch.tensor(counts, device=DEVICE, dtype=torch.int32)
    rows, transposed = gathered_rows_and_transpose(x_td, sources_c,
                                                   power_of_two, counts_e)
    reference = quantize_rows_and_transpose(x_td[sources_c], power_of_two,
                                            counts_e)
    _assert_same(rows, reference[0])
    _assert_same(transposed, reference[1])
