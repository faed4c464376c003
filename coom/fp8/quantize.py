"""FP8 quantisation in Triton: matrices to E4M3 values and float32 scales,
bit for bit as coom/fp8/scaling.py's reference.

Each group of entries gets ``scale = amax / 448`` (1 for a group of
zeros; with power-of-two scales ``exp2(ceil(log2(scale)))``), and its
values are ``clamp(x * (1 / scale), -448, 448)`` rounded to nearest even
E4M3: one division per group, then a product per entry, as DeepGEMM
quantises. All arithmetic is float32; the two divisions use
``tl.math.div_rn`` because Triton's ``/`` on float32 lowers to an
approximate division on NVIDIA GPUs, and the reference divides with IEEE
rounding. The E4M3 bytes are built from the float32 bits with integer
operations and stored through uint8 pointers: Triton 3.6's own
conversion to float8e4nv scrambles some float32 tiles on the GPU (pairs
of columns swapped), and its interpreter rounds half up. Transposed
copies are transposed in float32 and stored along their rows.

With ``traceable`` the launches go through ``torch.library.wrap_triton``
(``coom.kernels.launcher``), so that ``torch.compile`` traces them inside
``coom.fp8.ops``'s ``triton_op`` ops: inductor then launches the kernels
from its own generated code.

The layouts:

- ``quantize_rows``: x (m, k) in 1 x 128 tiles (per row, per 128
  columns). Values (m, k); scales (m, h) stored outer-dim-major, that is
  allocated (h, m) and returned transposed, the layout
  ``torch._scaled_mm`` wants for a blockwise ``scale_a``.
- ``quantize_rows_and_transpose``: the same, plus x^T (k, m) in 1 x 128
  tiles along m, from one read of x. Its scales (k, j) are stored (j, k)
  the same way. With ``counts_e`` each group of consecutive rows (an
  expert's tokens) starts a new tile, and x^T is tile-padded
  (``quantize_transposed``): values (k, 128 j), tile j in columns [128 j,
  128 j + 128), its rows then zeros. The launch covers the static bound
  j = ``max_group_tiles`` and each tile's rows are found on the device,
  so the counts are never read by the host. Each program writes its
  tile's 128 columns whole (an unused tile: zeros), in 16-byte vectors.
- ``quantize_blocks``: weights (n, k), or (e, n, k) one matrix per
  expert, in 128 x 128 blocks; scales (..., g, h) contiguous; optionally
  also the values of w^T (..., k, n) from the same pass.

Each program reads one tile of 128 x 128 entries once and writes
everything computed from it.

Tensor names end in their shape: m rows; k columns; h column tiles; j
row tiles (of the transpose's scales); c columns of the transpose's
values (m, or 128 j tile-padded); e groups or experts; n weight rows; g
weight row blocks.
"""
import torch
import triton
import triton.language as tl

from coom.fp8.scaling import (
    E4M3,
    E4M3_MAX,
    TILE,
    group_tile_starts,
    max_group_tiles,
)
from coom.kernels import launcher

# 4 warps: with one division per group (not per entry) the activation
# kernel ran fastest at 4 on an H100 at the small preset's sizes, the
# weight kernel within 2% of its best (docs/benchmarks.md, FP8
# quantisation kernels).
NUM_WARPS = 4
_E4M3_MAX = tl.constexpr(E4M3_MAX)
# Float32 bit patterns: E4M3's exponent bias (7) against float32's (127),
# in the position of the top 3 mantissa bits; and 2^-6, E4M3's smallest
# normal value. Below it E4M3 counts multiples of 2^-9, which are the low
# bits of 2^14 + magnitude.
_EXPONENT_REBIAS = tl.constexpr((127 - 7) << 23)
_SMALLEST_NORMAL = tl.constexpr(2.0 ** -6)
_SUBNORMAL_SHIFTER = tl.constexpr(2.0 ** 14)
_SUBNORMAL_SHIFTER_BITS = tl.constexpr(0x46800000)


@triton.jit
def _scale(amax, power_of_two: tl.constexpr):
    """(scale, 1 / scale) of a group whose largest magnitude is amax."""
    scale = tl.where(amax > 0, tl.math.div_rn(amax, _E4M3_MAX), 1.0)
    if power_of_two:
        scale = tl.math.exp2(tl.math.ceil(tl.math.log2(scale)))
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def _e4m3_code(magnitude):
    """The E4M3 byte (without sign) of a magnitude 0 <= magnitude <= 448,
    rounded to nearest even.

    Normal values: the float32 bits rounded at the third mantissa bit
    (adding half a unit less one, plus the kept unit's parity, carries
    exactly when nearest-even rounds up, into the exponent if need be),
    then re-biased. Subnormal values: adding 2^14 rounds to a multiple of
    2^-9 (float32's unit at 2^14), which the low bits then count.
    """
    bits = magnitude.to(tl.int32, bitcast=True)
    rounded = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = (rounded - _EXPONENT_REBIAS) >> 20
    subnormal = ((magnitude + _SUBNORMAL_SHIFTER).to(tl.int32, bitcast=True)
                 - _SUBNORMAL_SHIFTER_BITS)
    return tl.where(magnitude >= _SMALLEST_NORMAL, normal, subnormal)


@triton.jit
def _quantize(x, reciprocal):
    """E4M3 bytes (uint8) of x * reciprocal, clamped to +-448.

    The bytes are built with integer operations rather than Triton's
    conversion to float8e4nv: Triton 3.6 scrambles that conversion of
    some float32 tiles on the GPU, and its interpreter rounds half up.
    """
    scaled = x * reciprocal
    code = _e4m3_code(tl.minimum(tl.abs(scaled), _E4M3_MAX))
    sign = (scaled.to(tl.int32, bitcast=True) >> 24) & 0x80
    return (code | sign).to(tl.uint8)


@triton.jit
def _bytes(values_ptr):
    """An E4M3 tensor's pointer as the uint8 one ``_quantize``'s bytes
    are stored through."""
    return values_ptr.to(tl.pointer_type(tl.uint8))


@triton.jit
def _row_tiles_kernel(x_ptr, up_ptr, sources_ptr, values_mk_ptr,
                      scales_hm_ptr, values_kc_ptr, scales_jk_ptr, starts_ptr,
                      ends_ptr, m, k, stride_m, stride_k,
                      transpose: tl.constexpr, grouped: tl.constexpr,
                      gated: tl.constexpr, gathered: tl.constexpr,
                      power_of_two: tl.constexpr, tile: tl.constexpr):
    values_mk_ptr, values_kc_ptr = _bytes(values_mk_ptr), \
        _bytes(values_kc_ptr)
    row_tile = tl.program_id(0).to(tl.int64)
    column_tile = tl.program_id(1).to(tl.int64)
    if grouped:
        start = tl.load(starts_ptr + row_tile)
        end = tl.load(ends_ptr + row_tile)
    else:
        start = row_tile * tile
        end = tl.minimum(start + tile, m)
    rows = start + tl.arange(0, tile)
    columns = column_tile * tile + tl.arange(0, tile)
    row_mask, column_mask = rows < end, columns < k
    mask = row_mask[:, None] & column_mask[None, :]
    sources = rows
    if gathered:  # row i quantised is row sources[i] of x (a token's copy)
        sources = tl.load(sources_ptr + rows, mask=row_mask, other=0)
    offsets = sources[:, None] * stride_m + columns[None, :] * stride_k
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if gated:
        # x is SwiGLU's gate: the tile quantised is silu(gate) * up as
        # coom.kernels.swiglu computes and rounds it.
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = (x / (1.0 + tl.exp(-x)) * up).to(x_ptr.dtype.element_ty)
        x = x.to(tl.float32)
    magnitude = tl.abs(x)
    row_scale, row_reciprocal = _scale(tl.max(magnitude, axis=1),
                                       power_of_two)
    tl.store(values_mk_ptr + rows[:, None] * k + columns[None, :],
             _quantize(x, row_reciprocal[:, None]), mask=mask)
    tl.store(scales_hm_ptr + column_tile * m + rows, row_scale,
             mask=row_mask)
    if transpose:
        # An unused tile (no rows) has amax 0, so it writes scale 1.
        column_scale, column_reciprocal = _scale(tl.max(magnitude, axis=0),
                                                 power_of_two)
        offs_c = row_tile * tile + tl.arange(0, tile)
        if grouped:
            # The tile's own 128 columns, of rows 128 j long (j programs),
            # stored whole: its rows past the end are zeros (x loaded 0).
            stride_c = tl.multiple_of(tl.num_programs(0) * tile, tile)
            offs_c = tl.max_contiguous(tl.multiple_of(offs_c, tile), tile)
            mask_c = column_mask[:, None]
        else:
            stride_c = m
            mask_c = column_mask[:, None] & row_mask[None, :]
        # Transposed in float32, before quantising, and stored along rows:
        # Triton 3.6 scrambles some E4M3 tiles stored in transposed order.
        tl.store(values_kc_ptr + columns[:, None] * stride_c + offs_c[None, :],
                 _quantize(tl.trans(x), column_reciprocal[:, None]),
                 mask=mask_c)
        tl.store(scales_jk_ptr + row_tile * k + columns, column_scale,
                 mask=column_mask)


@triton.jit
def _blocks_kernel(w_ptr, values_ptr, scales_ptr, values_t_ptr, n, k,
                   stride_e, stride_n, stride_k, transpose: tl.constexpr,
                   power_of_two: tl.constexpr, tile: tl.constexpr):
    values_ptr, values_t_ptr = _bytes(values_ptr), _bytes(values_t_ptr)
    matrix = tl.program_id(0).to(tl.int64)
    row_block = tl.program_id(1).to(tl.int64)
    column_block = tl.program_id(2).to(tl.int64)
    rows = row_block * tile + tl.arange(0, tile)
    columns = column_block * tile + tl.arange(0, tile)
    mask = (rows < n)[:, None] & (columns < k)[None, :]
    w = tl.load(w_ptr + matrix * stride_e + rows[:, None] * stride_n
                + columns[None, :] * stride_k, mask=mask,
                other=0.0).to(tl.float32)
    scale, reciprocal = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0),
                               power_of_two)
    values = _quantize(w, reciprocal)
    base = matrix * n * k
    tl.store(values_ptr + base + rows[:, None] * k + columns[None, :],
             values, mask=mask)
    blocks = tl.num_programs(1) * tl.num_programs(2)
    tl.store(scales_ptr + matrix * blocks + row_block * tl.num_programs(2)
             + column_block, scale)
    if transpose:
        # Transposed in float32 before quantising, as in _row_tiles_kernel.
        mask_t = (columns < k)[:, None] & (rows < n)[None, :]
        tl.store(values_t_ptr + base + columns[:, None] * n + rows[None, :],
                 _quantize(tl.trans(w), reciprocal), mask=mask_t)


def _group_tile_rows(counts_e: torch.Tensor,
                     tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row, end row) of each row tile, int64 (j,), when each group
    of counts_e rows starts a new tile; unused tiles get (0, 0). Built on
    the device, without reading the counts on the host."""
    counts_e = counts_e.long()
    first_tile_e = group_tile_starts(counts_e)
    tile_ends_e = first_tile_e + (counts_e + TILE - 1) // TILE
    row_ends_e = counts_e.cumsum(0)
    tile_j = torch.arange(tiles, device=counts_e.device)
    group_j = torch.searchsorted(tile_ends_e, tile_j, right=True)
    used_j = group_j < len(counts_e)
    group_j = group_j.clamp(max=len(counts_e) - 1)
    row_end_j = row_ends_e[group_j]
    starts_j = (row_end_j - counts_e[group_j]
                + (tile_j - first_tile_e[group_j]) * TILE)
    ends_j = torch.minimum(starts_j + TILE, row_end_j)
    return starts_j.where(used_j, 0), ends_j.where(used_j, 0)


def _row_tiles(x_mk: torch.Tensor, power_of_two: bool, transpose: bool,
               counts_e: torch.Tensor | None, traceable: bool = False,
               up_mk: torch.Tensor | None = None,
               sources_m: torch.Tensor | None = None):
    """((values_mk, scales_mh), (values_kc, scales_kj)); the second pair
    only with transpose. With up, of silu(x) * up (x is the gate); with
    sources, of x[sources] (m = len(sources) rows)."""
    if up_mk is not None and (up_mk.shape != x_mk.shape
                              or up_mk.stride() != x_mk.stride()):
        raise ValueError(f"gate {tuple(x_mk.shape)} strides "
                         f"{x_mk.stride()} and up {tuple(up_mk.shape)} "
                         f"strides {up_mk.stride()} differ")
    m, k = x_mk.shape if sources_m is None else (len(sources_m),
                                                 x_mk.shape[1])
    column_tiles = triton.cdiv(k, TILE)
    grouped = counts_e is not None
    row_tiles = (max_group_tiles(m, len(counts_e)) if grouped
                 else triton.cdiv(m, TILE))
    float32 = dict(device=x_mk.device, dtype=torch.float32)
    values_mk = torch.empty(m, k, device=x_mk.device, dtype=E4M3)
    scales_hm = torch.empty(column_tiles, m, **float32)
    if transpose:
        # Without rows no program runs, and every tile is unused: zeros,
        # scale 1.
        values_kc = (torch.empty if m else torch.zeros)(
            k, row_tiles * TILE if grouped else m, device=x_mk.device,
            dtype=E4M3)
        scales_jk = (torch.empty if m else torch.ones)(row_tiles, k,
                                                       **float32)
    else:
        # The kernel writes no x^T. It gets empty stand-ins rather than
        # its other outputs again: torch.compile's analysis of what a
        # traced kernel writes must not see one tensor twice.
        values_kc = torch.empty(0, 0, device=x_mk.device, dtype=E4M3)
        scales_jk = torch.empty(0, 0, **float32)
    # On the meta device (the planner's) there is nothing to compute.
    if m and k and not x_mk.is_meta:
        # Ungrouped, the kernel reads no tile rows; ungated, no up;
        # ungathered, no sources: x stands in for each.
        starts_j, ends_j = (_group_tile_rows(counts_e, row_tiles)
                            if grouped else (x_mk, x_mk))
        launcher(_row_tiles_kernel, traceable)[(row_tiles, column_tiles)](
            x_mk, x_mk if up_mk is None else up_mk,
            x_mk if sources_m is None else sources_m, values_mk, scales_hm,
            values_kc, scales_jk, starts_j, ends_j, m, k, *x_mk.stride(),
            transpose=transpose, grouped=grouped, gated=up_mk is not None,
            gathered=sources_m is not None, power_of_two=power_of_two,
            tile=TILE, num_warps=NUM_WARPS)
    return (values_mk, scales_hm.t()), (values_kc, scales_jk.t())


def quantize_rows(x_mk: torch.Tensor, power_of_two: bool = False,
                  traceable: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values (m, k), float32 scales (m, h) with strides (1, m)) of
    x in 1 x 128 tiles: ``quantize(x, Grouping(1, 128))``."""
    return _row_tiles(x_mk, power_of_two, False, None, traceable)[0]


def quantize_rows_and_transpose(
        x_mk: torch.Tensor, power_of_two: bool = False,
        counts_e: torch.Tensor | None = None, traceable: bool = False
) -> tuple[tuple[torch.Tensor, torch.Tensor],
           tuple[torch.Tensor, torch.Tensor]]:
    """((values (m, k), scales (m, h)), (values (k, c), scales (k, j)))
    from one read of x: ``quantize_rows(x, power_of_two)`` and
    ``quantize_transposed(x, counts_e, power_of_two)``.

    counts_e (e,), on x's device, are the sizes of consecutive groups of
    rows and sum to m. Without them c = m and j = ceil(m / 128); with
    them j = ``max_group_tiles(m, e)`` and c = 128 j, tile-padded. Both
    scales are stored outer-dim-major: strides (1, m) and (1, k).
    """
    return _row_tiles(x_mk, power_of_two, True, counts_e, traceable)


def swiglu_rows_and_transpose(
        gate_mk: torch.Tensor, up_mk: torch.Tensor,
        power_of_two: bool = False, counts_e: torch.Tensor | None = None,
        traceable: bool = False
) -> tuple[tuple[torch.Tensor, torch.Tensor],
           tuple[torch.Tensor, torch.Tensor]]:
    """``quantize_rows_and_transpose`` of SwiGLU's ``silu(gate) * up``,
    computed and rounded to gate's dtype as ``coom.kernels.swiglu`` does,
    from one read of gate and up: the gated product itself is never
    written."""
    return _row_tiles(gate_mk, power_of_two, True, counts_e, traceable,
                      up_mk)


def gathered_rows_and_transpose(
        x_td: torch.Tensor, sources_m: torch.Tensor,
        power_of_two: bool = False, counts_e: torch.Tensor | None = None,
        traceable: bool = False
) -> tuple[tuple[torch.Tensor, torch.Tensor],
           tuple[torch.Tensor, torch.Tensor]]:
    """``quantize_rows_and_transpose`` of x[sources] (a token
    permutation's copies, ``coom.kernels.permute``), reading each copy's
    row where it is: the copies themselves are never written."""
    return _row_tiles(x_td, power_of_two, True, counts_e, traceable,
                      sources_m=sources_m)


def quantize_blocks(w: torch.Tensor, power_of_two: bool = False,
                    transpose: bool = False,
                    traceable: bool = False) -> tuple[torch.Tensor, ...]:
    """(E4M3 values (..., n, k), float32 scales (..., g, h)) of w (n, k)
    or (e, n, k) in 128 x 128 blocks, each matrix on its own:
    ``quantize(w, Grouping(128, 128))``. With transpose, a third output:
    the same values as w^T (..., k, n), contiguous; its scales are
    ``scales.transpose(-2, -1)``."""
    w_enk = w if w.dim() == 3 else w.unsqueeze(0)
    e, n, k = w_enk.shape
    row_blocks, column_blocks = triton.cdiv(n, TILE), triton.cdiv(k, TILE)
    values_enk = torch.empty(e, n, k, device=w.device, dtype=E4M3)
    scales_egh = torch.empty(e, row_blocks, column_blocks, device=w.device,
                             dtype=torch.float32)
    # An empty stand-in without transpose, as in _row_tiles.
    values_ekn = torch.empty((e, k, n) if transpose else (0,),
                             device=w.device, dtype=E4M3)
    if w_enk.numel() and not w_enk.is_meta:  # meta: as above
        grid = (e, row_blocks, column_blocks)
        launcher(_blocks_kernel, traceable)[grid](
            w_enk, values_enk, scales_egh, values_ekn, n, k, *w_enk.stride(),
            transpose=transpose, power_of_two=power_of_two, tile=TILE,
            num_warps=NUM_WARPS)
    batch = w.shape[:-2]
    outputs = (values_enk.view(w.shape),
               scales_egh.view(*batch, row_blocks, column_blocks))
    if transpose:
        outputs += (values_ekn.view(*batch, k, n),)
    return outputs
