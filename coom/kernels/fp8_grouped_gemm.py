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

Tiling. ``grouped_fp8_mm``: a program computes a block_m x block_n tile
of one group's rows; row tiles restart at each group's first row, so
there are at most ceil(t / block_m) + e of them, a bound the grid is made
of without reading the counts (no host synchronisation). Each program
finds its group from the counts; those past the last tile return.
``grouped_fp8_mm_wgrad``: a program computes a block_m x block_n tile of
one group's (n, k) gradient, walking the group's tiles, 128 columns
each. Both grids are group-major, so an expert's operands are reused
from L2 by neighbouring programs.

Alignment. Loads are 16-byte vectors, copied asynchronously and
pipelined, only where the compiler can prove 16-byte alignment: in
``grouped_fp8_mm`` when k % 16 == 0 (and unmasked when k % 128 == 0); in
``grouped_fp8_mm_wgrad`` always, and unmasked: its operands' tiles start
at multiples of 128 columns, of rows 128 j long, and are whole (zeros
past the group's rows, which add nothing), whatever the counts.

With ``traceable`` the weight gradient's launch goes through
``torch.library.wrap_triton`` (``coom.kernels.launcher``), so that
``torch.compile`` traces it inside ``coom.fp8.ops``'s ``triton_op`` op
and inductor launches (and autotunes) the kernel from its own generated
code. ``grouped_fp8_mm`` stays a whole op there (``coom.fp8.ops``).

Tensor names end in their shape: t rows; k summed columns; n output
columns; e groups (experts); h ceil(k / 128) column tiles; g ceil(n /
128) row blocks of a weight; j row tiles of the weight gradient's
operands (``max_group_tiles``); c = 128 j columns of their values.
"""
import torch
import triton
import triton.language as tl

from coom.fp8.scaling import TILE
from coom.kernels import launcher

# Timed by the autotuner for each (n, k) on first use; not yet measured
# here. The promotion keeps each step's dot result apart from the
# accumulator, twice the float32 registers, so a warpgroup holds 64 x 128
# at most (128 x 256 spilled; ptxas for sm_90a, offline): 128 x 128 tiles
# with 8 warps, one program per SM, or 64 x 128 with 4 warps and two or
# three programs per SM, one's promotion overlapping another's dot.
CONFIGS = [
    triton.Config({"block_m": 128, "block_n": 128}, num_warps=8,
                  num_stages=stages) for stages in (3, 4)
] + [
    triton.Config({"block_m": 64, "block_n": 128}, num_warps=4,
                  num_stages=stages) for stages in (3, 4)
]
# The forward's registers also fit 168 a thread (spilling outside the
# loop only), for three programs per SM; the weight gradient's do not.
FORWARD_CONFIGS = CONFIGS + [
    triton.Config({"block_m": 64, "block_n": 128}, num_warps=4,
                  num_stages=3, maxnreg=168),
]
# Triton's interpreter (CPU tensors): small tiles, so that tests cover
# partial and several tiles per group.
INTERPRETER_CONFIG = {"block_m": 32, "block_n": 64}


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
def _load_k(ptrs, k_left, even_k: tl.constexpr):
    """A (rows, block_k) block, its columns past k_left zeros unless k is
    a multiple of block_k (no mask, fewer registers)."""
    if even_k:
        block = tl.load(ptrs)
    else:
        mask = tl.arange(0, ptrs.shape[1]) < k_left
        block = tl.load(ptrs, mask=mask[None, :], other=0.0)
    return block


@triton.jit
def _grouped_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, counts_ptr,
                    out_ptr, t, n, k, groups, stride_sa_t, stride_sa_h,
                    stride_sb_e, stride_sb_g, stride_sb_h,
                    even_k: tl.constexpr, groups_pow2: tl.constexpr,
                    block_m: tl.constexpr, block_n: tl.constexpr,
                    block_k: tl.constexpr):
    tl.static_assert(block_k % block_n == 0)
    tiles_n = tl.cdiv(n, block_n)
    pid = tl.program_id(0)
    group, first_row, end_row = _row_tile(counts_ptr, groups, pid // tiles_n,
                                          groups_pow2, block_m)
    if group >= groups:
        return
    rows_m = (first_row + tl.arange(0, block_m)).to(tl.int64)
    cols_n = (pid % tiles_n) * block_n + tl.arange(0, block_n)
    # Loads read the rows past the group's end (those past t: the last
    # one) and the columns past n (wrapped around); the store drops them.
    rows_load = tl.minimum(rows_m, t - 1)
    offs_k = tl.arange(0, block_k)
    a_ptrs = a_ptr + rows_load[:, None] * k + offs_k[None, :]
    b_ptrs = (b_ptr + group.to(tl.int64) * n * k
              + (cols_n % n).to(tl.int64)[:, None] * k + offs_k[None, :])
    sa_ptrs = a_scale_ptr + rows_load * stride_sa_t
    # block_n divides 128, so one weight block's scale covers the tile.
    sb_ptr = (b_scale_ptr + group * stride_sb_e
              + (pid % tiles_n * block_n // block_k) * stride_sb_g)
    acc = tl.zeros((block_m, block_n), tl.float32)
    for h in range(0, tl.cdiv(k, block_k)):
        a = _load_k(a_ptrs, k - h * block_k, even_k)
        b = _load_k(b_ptrs, k - h * block_k, even_k)
        scale_m = tl.load(sa_ptrs + h * stride_sa_h)
        scale_m *= tl.load(sb_ptr + h * stride_sb_h)
        acc += tl.dot(a, tl.trans(b)) * scale_m[:, None]
        a_ptrs += block_k
        b_ptrs += block_k
    mask_m, mask_n = rows_m < end_row, cols_n < n
    out_ptrs = out_ptr + rows_m[:, None] * n + cols_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


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
def _scaled(acc, product, sa_ptr, sb_ptr, offs_sa, offs_sb):
    """acc plus one tile's product times the scales of a's rows and b's
    rows in that tile (sa_ptr, sb_ptr: the tile's column of scales)."""
    return acc + (product * tl.load(sa_ptr + offs_sa)[:, None]
                  * tl.load(sb_ptr + offs_sb)[None, :])


@triton.jit
def _wgrad_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, counts_ptr,
                  out_ptr, n, k, row_tiles, groups, stride_sa_n, stride_sa_j,
                  stride_sb_k, stride_sb_j, groups_pow2: tl.constexpr,
                  block_m: tl.constexpr, block_n: tl.constexpr,
                  tile: tl.constexpr):
    tiles_m, tiles_n = tl.cdiv(n, block_m), tl.cdiv(k, block_n)
    pid = tl.program_id(0)
    group = pid // (tiles_m * tiles_n)
    first_tile, tiles = _group_tiles(counts_ptr, group, groups, groups_pow2,
                                     tile)
    within = pid % (tiles_m * tiles_n)
    rows_m = (within // tiles_n) * block_m + tl.arange(0, block_m)
    cols_n = (within % tiles_n) * block_n + tl.arange(0, block_n)
    # The group's first tile: 128 columns from a multiple of 128, of rows
    # 128 j long. Rows of a and b past n and k wrap around (loads stay in
    # bounds); the store drops them.
    stride_c = tl.multiple_of(tl.cast(row_tiles, tl.int64) * tile, tile)
    offs_c = first_tile.to(tl.int64) * tile + tl.arange(0, tile)
    offs_c = tl.max_contiguous(tl.multiple_of(offs_c, tile), tile)
    a_ptrs = (a_ptr + (rows_m % n).to(tl.int64)[:, None] * stride_c
              + offs_c[None, :])
    b_ptrs = (b_ptr + (cols_n % k).to(tl.int64)[:, None] * stride_c
              + offs_c[None, :])
    sa_ptr = a_scale_ptr + first_tile.to(tl.int64) * stride_sa_j
    sb_ptr = b_scale_ptr + first_tile.to(tl.int64) * stride_sb_j
    offs_sa, offs_sb = rows_m % n * stride_sa_n, cols_n % k * stride_sb_k
    acc = tl.zeros((block_m, block_n), tl.float32)
    for j in range(0, tiles):
        product = tl.dot(tl.load(a_ptrs), tl.trans(tl.load(b_ptrs)))
        acc = _scaled(acc, product, sa_ptr + j * stride_sa_j,
                      sb_ptr + j * stride_sb_j, offs_sa, offs_sb)
        a_ptrs += tile
        b_ptrs += tile
    out_ptrs = (out_ptr + group.to(tl.int64) * n * k
                + rows_m.to(tl.int64)[:, None] * k + cols_n[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=(rows_m < n)[:, None] & (cols_n < k)[None, :])


_grouped_tuned = triton.autotune(FORWARD_CONFIGS, key=["n", "k"])(
    _grouped_kernel)
_wgrad_tuned = triton.autotune(CONFIGS, key=["n", "k"])(_wgrad_kernel)


def _kernel_and_config(kernel, tuned, on_gpu: bool):
    """What to launch and its meta-parameters: on the CPU the kernel
    with the interpreter's config; on a GPU the autotuner."""
    return (tuned, {}) if on_gpu else (kernel, INTERPRETER_CONFIG)


def tuned_configs() -> dict[str, dict]:
    """The autotuner's picks so far, per kernel and key (n, k, dtypes)."""
    return {name: {key: str(config) for key, config in tuned.cache.items()}
            for name, tuned in (("grouped_fp8_mm", _grouped_tuned),
                                ("grouped_fp8_mm_wgrad", _wgrad_tuned))}


def _require_contiguous(**tensors) -> None:
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (K-major)")


def grouped_fp8_mm(a_values_tk: torch.Tensor, a_scales_th: torch.Tensor,
                   b_values_enk: torch.Tensor, b_scales_egh: torch.Tensor,
                   counts_e: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(t, n): each group's rows of a @ b[e]^T, with a = a_values * its 1
    x 128 tile scales and b[e] = b_values[e] * its 128 x 128 block scales.

    a_values and b_values E4M3, contiguous; scales float32, any strides;
    counts_e (e,) integers on a's device, summing to t.
    """
    _require_contiguous(a_values_tk=a_values_tk, b_values_enk=b_values_enk)
    t, k = a_values_tk.shape
    groups, n, _ = b_values_enk.shape
    out_tn = a_values_tk.new_empty(t, n, dtype=out_dtype)
    if out_tn.numel() == 0:
        return out_tn

    def grid(meta):
        return ((triton.cdiv(t, meta["block_m"]) + groups)
                * triton.cdiv(n, meta["block_n"]),)
    launch, config = _kernel_and_config(_grouped_kernel, _grouped_tuned,
                                        a_values_tk.is_cuda)
    launch[grid](a_values_tk, a_scales_th, b_values_enk, b_scales_egh,
                 counts_e, out_tn, t, n, k, groups, *a_scales_th.stride(),
                 *b_scales_egh.stride(), even_k=k % TILE == 0,
                 groups_pow2=triton.next_power_of_2(groups), block_k=TILE,
                 **config)
    return out_tn


def grouped_fp8_mm_wgrad(a_values_nc: torch.Tensor,
                         a_scales_nj: torch.Tensor,
                         b_values_kc: torch.Tensor,
                         b_scales_kj: torch.Tensor, counts_e: torch.Tensor,
                         out_dtype: torch.dtype = torch.float32,
                         traceable: bool = False) -> torch.Tensor:
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
    _require_contiguous(a_values_nc=a_values_nc, b_values_kc=b_values_kc)
    (n, c), (k, b_c) = a_values_nc.shape, b_values_kc.shape
    if c % TILE or b_c != c:
        raise ValueError(f"operands of {c} and {b_c} columns: expected the "
                         f"same multiple of {TILE} (tile-padded)")
    groups = len(counts_e)
    out_enk = a_values_nc.new_empty(groups, n, k, dtype=out_dtype)
    if out_enk.numel() == 0:
        return out_enk

    def grid(meta):
        return (groups * triton.cdiv(n, meta["block_m"])
                * triton.cdiv(k, meta["block_n"]),)
    launch, config = _kernel_and_config(_wgrad_kernel, _wgrad_tuned,
                                        a_values_nc.is_cuda)
    launcher(launch, traceable)[grid](
        a_values_nc, a_scales_nj, b_values_kc, b_scales_kj, counts_e,
        out_enk, n, k, c // TILE, groups, *a_scales_nj.stride(),
        *b_scales_kj.stride(), groups_pow2=triton.next_power_of_2(groups),
        tile=TILE, **config)
    return out_enk
