"""Grouped FP8 matrix products of the routed experts, blockwise scaled
(DeepSeek-V3), in Triton.

Rows (token copies) are sorted by expert: group e holds ``counts_e[e]``
consecutive rows. An expert's linear layer ``y = x @ W_e^T`` needs three
products, each summing over the contiguous dimension of both operands,
because FP8 tensor-core instructions (wgmma) read both K-major:

- forward, ``y = x @ W_e^T``: ``grouped_fp8_mm(x, W)``;
- input gradient, ``dx = dy @ W_e``: ``grouped_fp8_mm(dy, W^T)``, with
  W^T a K-major copy (e, k, n) of the weights;
- weight gradient, ``dW_e = dy_e^T @ x_e``: ``grouped_fp8_mm_wgrad(dy^T,
  x^T)``, summing over the group's rows, with both operands transposed
  (rows contiguous) and tile-padded.

Activations and gradients come in 1 x 128 tiles along the summed
dimension, one float32 scale each; weights in 128 x 128 blocks
(``coom.fp8.scaling``). The weight gradient's tiles restart at each
group's first row, so no tile mixes experts, and each tile has its own
128 columns (``quantize_transposed(x, counts_e)``): operands (n, 128 j),
tile i of group e in the columns from 128 (group_tile_starts(counts_e)[e]
+ i), the group's rows then zeros to the tile's end.
The products sum each 128 summed columns in the tensor cores and apply
the two scales to that partial sum in float32 (DeepGEMM's promotion):
``acc += dot(a_blk, b_blk) * scale_a * scale_b``.

Tiling. ``grouped_fp8_mm``: a block_m x block_n tile of one group's
rows at a time; row tiles restart at each group's first row, so there
are at most ceil(t / block_m) + e of them, a bound the tiles are counted
by without reading the counts (no host synchronisation). Each tile's
group is found from the counts on the device; tiles past the last one
are skipped. ``grouped_fp8_mm_wgrad``: a block_m x block_n tile of one
group's (n, k) gradient at a time, walking the group's tiles, 128
columns each. Both walk their tiles group-major, so an expert's operands
are reused from L2 by neighbouring programs.

Persistent, with TMA loads. The grid is 3 programs an SM (4 warps, at
most 168 registers a thread, 3 stages of shared memory each), each
walking every 3 x SMs-th tile, so one program's promotion and epilogue
overlap the others' products. Operands are loaded by the tensor memory
accelerator, through descriptors each program builds on the device:
rows and columns past the tensor's edge come as zeros, so the loads need
no masks and no index arithmetic. Rows past a group's end within the
tensor (the next group's) are loaded too and dropped by the store.
Against pointer loads, one program a tile, this design ran the
products at 1.0-1.3x bf16's speed instead of 0.85-1.1x on an H100
(``docs/benchmarks.md``, "Grouped FP8 GEMMs"). TMA wants the rows of
each operand 16-byte aligned: k a multiple of 16 for ``grouped_fp8_mm``
(the weight gradient's operands are tile-padded anyway). The
descriptors live in global memory that Triton takes from the allocator
set with ``triton.set_allocator``; every call sets one, from torch's
caching allocator, because Triton keeps it per thread context and
backward passes run in autograd's own threads.

Tensor names end in their shape: t rows; k summed columns; n output
columns; e groups (experts); h ceil(k / 128) column tiles; g ceil(n /
128) row blocks of a weight; j row tiles of the weight gradient's
operands (``max_group_tiles``); c = 128 j columns of their values.
"""
import functools

import torch
import triton
import triton.language as tl

from coom.fp8.scaling import TILE
from coom.kernels import bf16_nearest_even

# Timed by the autotuner for each (n, k) on first use. A program keeps
# each step's product apart from the accumulator for the promotion, twice
# the float32 registers; with 4 warps and at most 168 registers a thread,
# three programs fit an SM. The best of these ran the forward and input
# gradient at 128 x 64, the weight gradient at 64 x 128, on an H100 at
# the small preset's shapes; 128 x 128 tiles (8 warps, one program an
# SM), 4 stages or 4 programs an SM were slower (docs/benchmarks.md).
PROGRAMS_PER_SM = 3
CONFIGS = [
    triton.Config({"block_m": block_m, "block_n": block_n}, num_warps=4,
                  num_stages=3, maxnreg=maxnreg)
    for block_m, block_n, maxnreg in ((128, 64, 168), (64, 128, 168),
                                      (64, 128, 160))
]
# Triton's interpreter (CPU tensors): small tiles, so that tests cover
# partial and several tiles per group, and fewer programs than tiles, so
# that they cover a program's walk over several.
INTERPRETER_CONFIG = {"block_m": 32, "block_n": 64}
INTERPRETER_PROGRAMS = 3


@triton.jit
def _row_tile(counts_ptr, groups, row_tile, groups_pow2: tl.constexpr,
              block_m: tl.constexpr):
    """(group, first row of the tile, end row of the group) of a row tile
    when each group's rows start new tiles; the group is at least
    ``groups`` past the last tile."""
    index_e = tl.arange(0, groups_pow2)
    counts_e = tl.load(counts_ptr + index_e, mask=index_e < groups,
                       other=0).to(tl.int32)
    tiles_e = (counts_e + block_m - 1) // block_m
    group = tl.sum((tl.cumsum(tiles_e, 0) <= row_tile).to(tl.int32), 0)
    before = index_e < group
    start = tl.sum(tl.where(before, counts_e, 0), 0)
    first_tile = tl.sum(tl.where(before, tiles_e, 0), 0)
    count = tl.sum(tl.where(index_e == group, counts_e, 0), 0)
    return group, start + (row_tile - first_tile) * block_m, start + count


@triton.jit
def _grouped_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, counts_ptr,
                    out_ptr, t, n, k, groups, stride_sa_t, stride_sa_h,
                    stride_sb_e, stride_sb_g, stride_sb_h,
                    groups_pow2: tl.constexpr, block_m: tl.constexpr,
                    block_n: tl.constexpr, block_k: tl.constexpr):
    tl.static_assert(block_k % block_n == 0)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[t, k], strides=[k, 1],
                                       block_shape=[block_m, block_k])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[groups * n, k],
                                       strides=[k, 1],
                                       block_shape=[block_n, block_k])
    tiles_n = tl.cdiv(n, block_n)
    tiles = (tl.cdiv(t, block_m) + groups) * tiles_n
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0)):
        group, first_row, end_row = _row_tile(
            counts_ptr, groups, tile // tiles_n, groups_pow2, block_m)
        if group < groups:
            first_col = tile % tiles_n * block_n
            rows_m = first_row + tl.arange(0, block_m)
            cols_n = first_col + tl.arange(0, block_n)
            # Rows past t take the last row's scales (their values load
            # as zeros); the store drops them, and the columns past n.
            sa_ptrs = a_scale_ptr + tl.minimum(rows_m, t - 1) * stride_sa_t
            # block_n divides 128, so one weight block's scale covers the
            # tile.
            sb_ptr = (b_scale_ptr + group * stride_sb_e
                      + first_col // block_k * stride_sb_g)
            acc = tl.zeros((block_m, block_n), tl.float32)
            for h in range(0, tl.cdiv(k, block_k)):
                a = a_desc.load([first_row, h * block_k])
                b = b_desc.load([group * n + first_col, h * block_k])
                scale_m = tl.load(sa_ptrs + h * stride_sa_h)
                scale_m *= tl.load(sb_ptr + h * stride_sb_h)
                acc += tl.dot(a, tl.trans(b)) * scale_m[:, None]
            out_ptrs = (out_ptr + rows_m.to(tl.int64)[:, None] * n
                        + cols_n[None, :])
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                     mask=(rows_m < end_row)[:, None]
                     & (cols_n < n)[None, :])


@triton.jit
def _group_tiles(counts_ptr, group, groups, groups_pow2: tl.constexpr,
                 tile: tl.constexpr):
    """(first tile, tiles) of a group when each group's rows start new
    tiles."""
    index_e = tl.arange(0, groups_pow2)
    counts_e = tl.load(counts_ptr + index_e, mask=index_e < groups,
                       other=0).to(tl.int32)
    tiles_e = (counts_e + tile - 1) // tile
    first_tile = tl.sum(tl.where(index_e < group, tiles_e, 0), 0)
    return first_tile, tl.sum(tl.where(index_e == group, tiles_e, 0), 0)


@triton.jit
def _wgrad_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, counts_ptr,
                  out_ptr, n, k, row_tiles, groups, stride_sa_n, stride_sa_j,
                  stride_sb_k, stride_sb_j, groups_pow2: tl.constexpr,
                  block_m: tl.constexpr, block_n: tl.constexpr,
                  tile: tl.constexpr):
    c = row_tiles * tile
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[n, c], strides=[c, 1],
                                       block_shape=[block_m, tile])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[k, c], strides=[c, 1],
                                       block_shape=[block_n, tile])
    tiles_m, tiles_n = tl.cdiv(n, block_m), tl.cdiv(k, block_n)
    for pid in tl.range(tl.program_id(0), groups * tiles_m * tiles_n,
                        tl.num_programs(0)):
        group = pid // (tiles_m * tiles_n)
        first_tile, group_tiles = _group_tiles(counts_ptr, group, groups,
                                               groups_pow2, tile)
        within = pid % (tiles_m * tiles_n)
        first_row = within // tiles_n * block_m
        first_col = within % tiles_n * block_n
        rows_m = first_row + tl.arange(0, block_m)
        cols_n = first_col + tl.arange(0, block_n)
        # Scales of rows past n and k wrap around (their values load as
        # zeros); the store drops them.
        sa_ptrs = (a_scale_ptr + first_tile.to(tl.int64) * stride_sa_j
                   + rows_m % n * stride_sa_n)
        sb_ptrs = (b_scale_ptr + first_tile.to(tl.int64) * stride_sb_j
                   + cols_n % k * stride_sb_k)
        acc = tl.zeros((block_m, block_n), tl.float32)
        for j in range(0, group_tiles):
            column = (first_tile + j) * tile
            product = tl.dot(a_desc.load([first_row, column]),
                             tl.trans(b_desc.load([first_col, column])))
            acc += (product * tl.load(sa_ptrs + j * stride_sa_j)[:, None]
                    * tl.load(sb_ptrs + j * stride_sb_j)[None, :])
        out_ptrs = (out_ptr + group.to(tl.int64) * n * k
                    + rows_m.to(tl.int64)[:, None] * k + cols_n[None, :])
        if out_ptr.dtype.element_ty == tl.bfloat16:
            out = bf16_nearest_even(acc)  # as torch casts the sums
        else:
            out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, out,
                 mask=(rows_m < n)[:, None] & (cols_n < k)[None, :])


_grouped_tuned = triton.autotune(CONFIGS, key=["n", "k"])(_grouped_kernel)
_wgrad_tuned = triton.autotune(CONFIGS, key=["n", "k"])(_wgrad_kernel)


@functools.cache
def _programs(device: torch.device) -> int:
    """How many programs a persistent launch on device runs."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM \
        * torch.cuda.get_device_properties(device).multi_processor_count


def _launch(kernel, tuned, tiles, device: torch.device):
    """The kernel launched over min(tiles, programs) programs, with the
    meta-parameters it needs (on the CPU the interpreter's config, on a
    GPU the autotuner's) and an allocator for its TMA descriptors (the
    module docstring says why on every call)."""
    programs = _programs(device)

    def grid(meta):
        return (min(tiles(meta), programs),)
    triton.set_allocator(functools.partial(_descriptor_memory, device))
    if device.type != "cuda":
        return functools.partial(kernel[grid], **INTERPRETER_CONFIG)
    return tuned[grid]


# torch's allocations start on 512-byte boundaries (its caching
# allocator's blocks) or, on the CPU, 64-byte ones.
_ALIGNMENT = {"cuda": 512, "cpu": 64}


def _descriptor_memory(device: torch.device, size: int, alignment: int,
                       stream) -> torch.Tensor:
    """Memory for the kernels' TMA descriptors on device, from torch."""
    if alignment > _ALIGNMENT[device.type]:
        raise ValueError(f"Triton asks for {alignment}-byte aligned "
                         f"memory; torch's {device.type} allocations "
                         f"guarantee {_ALIGNMENT[device.type]}")
    return torch.empty(size, dtype=torch.int8, device=device)


def tuned_configs() -> dict[str, dict]:
    """The autotuner's picks so far, per kernel and key (n, k, dtypes)."""
    return {name: {key: str(config) for key, config in tuned.cache.items()}
            for name, tuned in (("grouped_fp8_mm", _grouped_tuned),
                                ("grouped_fp8_mm_wgrad", _wgrad_tuned))}


def _require_tma_operands(**tensors) -> None:
    """Contiguous, starting on a 16-byte boundary, rows of a multiple of
    16 bytes: what the TMA descriptors need."""
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (K-major)")
        if tensor.data_ptr() % 16 or tensor.shape[-1] % 16:
            raise ValueError(
                f"{name} must start on a 16-byte boundary and have rows "
                f"of a multiple of 16 entries (TMA); it has "
                f"{tensor.shape[-1]}")


def grouped_fp8_mm(a_values_tk: torch.Tensor, a_scales_th: torch.Tensor,
                   b_values_enk: torch.Tensor, b_scales_egh: torch.Tensor,
                   counts_e: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(t, n): each group's rows of a @ b[e]^T, with a = a_values * its 1
    x 128 tile scales and b[e] = b_values[e] * its 128 x 128 block scales.

    a_values and b_values E4M3, contiguous, k a multiple of 16; scales
    float32, any strides; counts_e (e,) integers on a's device, summing
    to t.
    """
    _require_tma_operands(a_values_tk=a_values_tk, b_values_enk=b_values_enk)
    t, k = a_values_tk.shape
    groups, n, _ = b_values_enk.shape
    out_tn = a_values_tk.new_empty(t, n, dtype=out_dtype)
    if out_tn.numel() == 0:
        return out_tn

    def tiles(meta):
        return ((triton.cdiv(t, meta["block_m"]) + groups)
                * triton.cdiv(n, meta["block_n"]))
    _launch(_grouped_kernel, _grouped_tuned, tiles, a_values_tk.device)(
        a_values_tk, a_scales_th, b_values_enk, b_scales_egh, counts_e,
        out_tn, t, n, k, groups, *a_scales_th.stride(),
        *b_scales_egh.stride(), groups_pow2=triton.next_power_of_2(groups),
        block_k=TILE)
    return out_tn


def grouped_fp8_mm_wgrad(a_values_nc: torch.Tensor,
                         a_scales_nj: torch.Tensor,
                         b_values_kc: torch.Tensor,
                         b_scales_kj: torch.Tensor, counts_e: torch.Tensor,
                         out_dtype: torch.dtype = torch.float32
                         ) -> torch.Tensor:
    """(e, n, k): for each group, the sum over its rows of a[:, row]
    b[:, row]^T, i.e. dW_e = dy_e^T x_e with a = dy^T and b = x^T; zeros
    for groups without rows.

    a and b E4M3, contiguous, tile-padded (``quantize_transposed(x,
    counts_e)``): values (n, c) and (k, c), c = 128 j, tile i of group e
    in the 128 columns from 128 (``group_tile_starts(counts_e)[e]`` + i),
    zeros past the group's rows; scales (n, j) and (k, j), float32, any
    strides. counts_e (e,) integers on a's device, those the operands
    were made with.
    """
    (n, c), (k, b_c) = a_values_nc.shape, b_values_kc.shape
    if c % TILE or b_c != c:
        raise ValueError(f"operands of {c} and {b_c} columns: expected the "
                         f"same multiple of {TILE} (tile-padded)")
    _require_tma_operands(a_values_nc=a_values_nc, b_values_kc=b_values_kc)
    groups = len(counts_e)
    out_enk = a_values_nc.new_empty(groups, n, k, dtype=out_dtype)
    if out_enk.numel() == 0:
        return out_enk

    def tiles(meta):
        return (groups * triton.cdiv(n, meta["block_m"])
                * triton.cdiv(k, meta["block_n"]))
    _launch(_wgrad_kernel, _wgrad_tuned, tiles, a_values_nc.device)(
        a_values_nc, a_scales_nj, b_values_kc, b_scales_kj, counts_e,
        out_enk, n, k, c // TILE, groups, *a_scales_nj.stride(),
        *b_scales_kj.stride(), groups_pow2=triton.next_power_of_2(groups),
        tile=TILE)
    return out_enk
