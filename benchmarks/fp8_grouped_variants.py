"""Candidate designs of the experts' grouped FP8 GEMMs, timed against bf16
``torch._grouped_mm`` and COOM's current kernels at the small preset's
shapes (a sweep, to pick what coom/kernels/fp8_grouped_gemm.py becomes).

Variants (flags of one kernel per product):
- tma: operands loaded by the tensor memory accelerator (device-side
  descriptors) instead of pointer loads;
- overlap: the product of step h+1 is issued before step h's partial sum
  is scaled into the accumulator (software pipelining by hand), so the
  tensor cores need not wait for the promotion;
- persist: one program per SM slot walks the tiles;
- bound: no promotion at all (acc = dot(a, b, acc), scales ignored):
  wrong numbers, the speed a promotion-free kernel would reach.

    python3 benchmarks/fp8_grouped_variants.py
"""
import itertools
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from benchmarks.fp8_gemm import quantized, relative_error, uneven_counts
from coom.kernels.fp8_grouped_gemm import (
    _group_tiles,
    _row_tile,
    grouped_fp8_mm,
    grouped_fp8_mm_wgrad,
)


@triton.jit
def _fwd(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, counts_ptr, out_ptr, t, n,
         k, groups, stride_sa_t, stride_sa_h, stride_sb_e, stride_sb_g,
         stride_sb_h, groups_pow2: tl.constexpr, block_m: tl.constexpr,
         block_n: tl.constexpr, block_k: tl.constexpr, tma: tl.constexpr,
         overlap: tl.constexpr, bound: tl.constexpr,
         flatten: tl.constexpr):
    tiles_n = tl.cdiv(n, block_n)
    total = (tl.cdiv(t, block_m) + groups) * tiles_n
    steps = tl.cdiv(k, block_k)
    if tma:
        a_desc = tl.make_tensor_descriptor(
            a_ptr, shape=[t, k], strides=[k, 1],
            block_shape=[block_m, block_k])
        b_desc = tl.make_tensor_descriptor(
            b_ptr, shape=[groups * n, k], strides=[k, 1],
            block_shape=[block_n, block_k])
    for tile in tl.range(tl.program_id(0), total, tl.num_programs(0),
                         flatten=flatten):
        group, first_row, end_row = _row_tile(
            counts_ptr, groups, tile // tiles_n, groups_pow2, block_m)
        if group < groups:
            col0 = (tile % tiles_n) * block_n
            rows_m = first_row + tl.arange(0, block_m)
            rows_load = tl.minimum(rows_m, t - 1)
            cols_n = col0 + tl.arange(0, block_n)
            offs_k = tl.arange(0, block_k)
            a_ptrs = (a_ptr + rows_load.to(tl.int64)[:, None] * k
                      + offs_k[None, :])
            b_ptrs = (b_ptr + group.to(tl.int64) * n * k
                      + (cols_n % n).to(tl.int64)[:, None] * k
                      + offs_k[None, :])
            sa_ptrs = a_scale_ptr + rows_load * stride_sa_t
            if block_n > block_k:
                sb_ptr = (b_scale_ptr + group * stride_sb_e
                          + ((cols_n % n) // block_k) * stride_sb_g)
            else:
                sb_ptr = (b_scale_ptr + group * stride_sb_e
                          + (col0 // block_k) * stride_sb_g)
            acc = tl.zeros((block_m, block_n), tl.float32)
            if overlap:
                if tma:
                    a = a_desc.load([first_row, 0])
                    b = b_desc.load([group * n + col0, 0])
                else:
                    a = tl.load(a_ptrs)
                    b = tl.load(b_ptrs)
                part = tl.dot(a, tl.trans(b))
                for h in range(1, steps):
                    if tma:
                        a = a_desc.load([first_row, h * block_k])
                        b = b_desc.load([group * n + col0, h * block_k])
                    else:
                        a = tl.load(a_ptrs + h * block_k)
                        b = tl.load(b_ptrs + h * block_k)
                    following = tl.dot(a, tl.trans(b))
                    scale = tl.load(sa_ptrs + (h - 1) * stride_sa_h) \
                        * tl.load(sb_ptr + (h - 1) * stride_sb_h)
                    acc += part * scale[:, None]
                    part = following
                scale = tl.load(sa_ptrs + (steps - 1) * stride_sa_h) \
                    * tl.load(sb_ptr + (steps - 1) * stride_sb_h)
                acc += part * scale[:, None]
            else:
                for h in range(0, steps):
                    if tma:
                        a = a_desc.load([first_row, h * block_k])
                        b = b_desc.load([group * n + col0, h * block_k])
                    else:
                        a = tl.load(a_ptrs + h * block_k)
                        b = tl.load(b_ptrs + h * block_k)
                    if bound:
                        acc = tl.dot(a, tl.trans(b), acc)
                    elif block_n > block_k:
                        acc += (tl.dot(a, tl.trans(b))
                                * tl.load(sa_ptrs + h * stride_sa_h)[:, None]
                                * tl.load(sb_ptr + h * stride_sb_h)[None, :])
                    else:
                        scale = tl.load(sa_ptrs + h * stride_sa_h) \
                            * tl.load(sb_ptr + h * stride_sb_h)
                        acc += tl.dot(a, tl.trans(b)) * scale[:, None]
            out_ptrs = out_ptr + rows_m.to(tl.int64)[:, None] * n \
                + cols_n[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                     mask=(rows_m < end_row)[:, None]
                     & (cols_n < n)[None, :])


@triton.jit
def _wgrad(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, counts_ptr, out_ptr, n,
           k, row_tiles, groups, stride_sa_n, stride_sa_j, stride_sb_k,
           stride_sb_j, groups_pow2: tl.constexpr, block_m: tl.constexpr,
           block_n: tl.constexpr, tile: tl.constexpr, tma: tl.constexpr,
           overlap: tl.constexpr, bound: tl.constexpr,
           flatten: tl.constexpr):
    tiles_m, tiles_n = tl.cdiv(n, block_m), tl.cdiv(k, block_n)
    c = row_tiles * tile
    if tma:
        a_desc = tl.make_tensor_descriptor(
            a_ptr, shape=[n, c], strides=[c, 1],
            block_shape=[block_m, tile])
        b_desc = tl.make_tensor_descriptor(
            b_ptr, shape=[k, c], strides=[c, 1],
            block_shape=[block_n, tile])
    total = groups * tiles_m * tiles_n
    stride_c = tl.multiple_of(tl.cast(row_tiles, tl.int64) * tile, tile)
    for pid in tl.range(tl.program_id(0), total, tl.num_programs(0),
                        flatten=flatten):
        group = pid // (tiles_m * tiles_n)
        first_tile, tiles = _group_tiles(counts_ptr, group, groups,
                                         groups_pow2, tile)
        within = pid % (tiles_m * tiles_n)
        row0 = (within // tiles_n) * block_m
        col0 = (within % tiles_n) * block_n
        rows_m = row0 + tl.arange(0, block_m)
        cols_n = col0 + tl.arange(0, block_n)
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
        if overlap:
            if tma:
                a = a_desc.load([row0, first_tile * tile])
                b = b_desc.load([col0, first_tile * tile])
            else:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            part = tl.dot(a, tl.trans(b))
            for j in range(1, tiles):
                if tma:
                    a = a_desc.load([row0, (first_tile + j) * tile])
                    b = b_desc.load([col0, (first_tile + j) * tile])
                else:
                    a = tl.load(a_ptrs + j * tile)
                    b = tl.load(b_ptrs + j * tile)
                following = tl.dot(a, tl.trans(b))
                acc += (part
                        * tl.load(sa_ptr + (j - 1) * stride_sa_j
                                  + offs_sa)[:, None]
                        * tl.load(sb_ptr + (j - 1) * stride_sb_j
                                  + offs_sb)[None, :])
                part = following
            if tiles > 0:
                acc += (part
                        * tl.load(sa_ptr + (tiles - 1) * stride_sa_j
                                  + offs_sa)[:, None]
                        * tl.load(sb_ptr + (tiles - 1) * stride_sb_j
                                  + offs_sb)[None, :])
        else:
            for j in range(0, tiles):
                if tma:
                    a = a_desc.load([row0, (first_tile + j) * tile])
                    b = b_desc.load([col0, (first_tile + j) * tile])
                else:
                    a = tl.load(a_ptrs + j * tile)
                    b = tl.load(b_ptrs + j * tile)
                if bound:
                    acc = tl.dot(a, tl.trans(b), acc)
                else:
                    acc += (tl.dot(a, tl.trans(b))
                            * tl.load(sa_ptr + j * stride_sa_j
                                      + offs_sa)[:, None]
                            * tl.load(sb_ptr + j * stride_sb_j
                                      + offs_sb)[None, :])
        out_ptrs = (out_ptr + group.to(tl.int64) * n * k
                    + rows_m.to(tl.int64)[:, None] * k + cols_n[None, :])
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=(rows_m < n)[:, None] & (cols_n < k)[None, :])


# (block_m, block_n, warps, stages, maxnreg, programs per SM when
# persistent)
# The first sweep (2026-11-25) tried pointer loads, the promotion
# overlapped by hand and no persistence too: TMA loads in a persistent
# grid of 3 programs an SM won every product; the overlap lost every time.
CONFIGS = [(64, 128, 4, 3, 168, 3), (64, 128, 4, 2, 168, 3),
           (64, 128, 4, 4, 168, 3), (64, 128, 4, 3, 160, 3),
           (64, 128, 4, 3, 128, 4), (128, 64, 4, 3, 168, 3),
           (128, 64, 4, 4, None, 2), (64, 256, 8, 3, None, 1),
           (128, 128, 8, 3, None, 1)]
VARIANTS = {  # name: (tma, overlap, persist, bound, flatten)
    "tma+persist": (True, False, True, False, False),
    "tma+persist+flatten": (True, False, True, False, True),
    "bound (wrong)": (True, False, True, True, False),
}
SMS = torch.cuda.get_device_properties(0).multi_processor_count \
    if torch.cuda.is_available() else 2


def forward_call(a, a_s, b, b_s, counts, variant, config):
    tma, overlap, persist, bound, flatten = VARIANTS[variant]
    block_m, block_n, warps, stages, maxnreg, per_sm = config
    t, k = a.shape
    groups, n, _ = b.shape
    out = a.new_empty(t, n, dtype=torch.bfloat16)
    tiles = (triton.cdiv(t, block_m) + groups) * triton.cdiv(n, block_n)
    grid = (min(tiles, SMS * per_sm) if persist else tiles,)
    extra = {"maxnreg": maxnreg} if maxnreg else {}

    def call():
        _fwd[grid](a, a_s, b, b_s, counts, out, t, n, k, groups,
                   *a_s.stride(), *b_s.stride(),
                   groups_pow2=triton.next_power_of_2(groups),
                   block_m=block_m, block_n=block_n, block_k=128, tma=tma,
                   overlap=overlap, bound=bound, flatten=flatten,
                   num_warps=warps,
                   num_stages=stages, **extra)
        return out
    return call


def wgrad_call(a, a_s, b, b_s, counts, variant, config):
    tma, overlap, persist, bound, flatten = VARIANTS[variant]
    block_m, block_n, warps, stages, maxnreg, per_sm = config
    (n, c), (k, _) = a.shape, b.shape
    groups = len(counts)
    out = a.new_empty(groups, n, k, dtype=torch.float32)
    tiles = groups * triton.cdiv(n, block_m) * triton.cdiv(k, block_n)
    grid = (min(tiles, SMS * per_sm) if persist else tiles,)
    extra = {"maxnreg": maxnreg} if maxnreg else {}

    def call():
        _wgrad[grid](a, a_s, b, b_s, counts, out, n, k, c // 128, groups,
                     *a_s.stride(), *b_s.stride(),
                     groups_pow2=triton.next_power_of_2(groups),
                     block_m=block_m, block_n=block_n, tile=128, tma=tma,
                     overlap=overlap, bound=bound, flatten=flatten,
                     num_warps=warps, num_stages=stages, **extra)
        return out
    return call


def _products(k: int, n: int, counts: torch.Tensor):
    """(name, bf16 call, current FP8 call, reference call, operands) of
    the three products, operands as (values, scales, values, scales)."""
    rows, experts = int(counts.sum()), len(counts)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(experts, n, k, device="cuda") / k ** 0.5).bfloat16()
    offs = counts.cumsum(0).to(torch.int32)
    fp8, (x_d, dy_d, w_d, dy_w, x_w) = quantized(x, dy, w, counts)
    return [
        ("forward",
         lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
         lambda: grouped_fp8_mm(*fp8["x"], *fp8["w"], counts),
         lambda: torch._grouped_mm(x_d, w_d.transpose(-2, -1), offs=offs),
         (*fp8["x"], *fp8["w"])),
        ("input grad", lambda: torch._grouped_mm(dy, w, offs=offs),
         lambda: grouped_fp8_mm(*fp8["dy"], *fp8["w^T"], counts),
         lambda: torch._grouped_mm(dy_d, w_d, offs=offs),
         (*fp8["dy"], *fp8["w^T"])),
        ("weight grad", lambda: torch._grouped_mm(dy.t(), x, offs=offs),
         lambda: grouped_fp8_mm_wgrad(*fp8["dy^T"], *fp8["x^T"], counts),
         lambda: torch._grouped_mm(dy_w.t(), x_w, offs=offs),
         (*fp8["dy^T"], *fp8["x^T"])),
    ]


def main() -> None:
    triton.set_allocator(lambda size, alignment, stream: torch.empty(
        size, device="cuda", dtype=torch.int8))
    torch.manual_seed(0)
    experts, rows = 64, 1536
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, "
          f"{experts} experts x {rows} rows\n")
    started = time.time()
    for (k, n), (label, counts) in itertools.product(
            ((1536, 1024), (512, 1536)),
            (("even", torch.full((experts,), rows, device="cuda")),
             ("uneven", uneven_counts(experts, rows)))):
        flop = 2 * experts * rows * k * n
        for name, bf16, current, reference, operands in _products(k, n,
                                                                  counts):
            expected = reference()
            bf16_ms = do_bench_cudagraph(bf16, return_mode="median")
            current_ms = do_bench_cudagraph(current, return_mode="median")
            print(f"## {k} -> {n}, {name}, {label}: bf16 "
                  f"{flop / bf16_ms / 1e9:,.0f} TFLOP/s, current FP8 "
                  f"{flop / current_ms / 1e9:,.0f} "
                  f"({bf16_ms / current_ms:.2f}x)", flush=True)
            make = wgrad_call if name == "weight grad" else forward_call
            best = {}
            for variant, config in itertools.product(VARIANTS, CONFIGS):
                try:
                    call = make(*operands, counts, variant, config)
                    error = relative_error(call(), expected)
                    ms = do_bench_cudagraph(call, return_mode="median")
                except Exception as failure:  # a config that cannot run
                    print(f"  {variant} {config}: failed "
                          f"{type(failure).__name__}: "
                          f"{str(failure).splitlines()[0][:100]}")
                    continue
                ok = variant.startswith("bound") or error < 1e-2
                print(f"  {variant:22s} {str(config):30s} "
                      f"{flop / ms / 1e9:6,.0f} TFLOP/s "
                      f"{bf16_ms / ms:.2f}x error {error:.4f}"
                      f"{'' if ok else ' WRONG'}", flush=True)
                if ok and (variant not in best or ms < best[variant][0]):
                    best[variant] = (ms, config)
            for variant, (ms, config) in best.items():
                print(f"  best {variant}: {bf16_ms / ms:.2f}x of bf16 "
                      f"{config}")
            print(f"  ({time.time() - started:.0f} s so far)", flush=True)


if __name__ == "__main__":
    main()
