"""The experts' grouped products in blockwise FP8 (Triton,
``coom.fp8.grouped_gemm``) against bf16 ``torch._grouped_mm``,
at the small preset's expert shapes: 64 experts x 1536 rows (98,304
rows), products 1536 -> 1024 and 512 -> 1536.

For each: the forward ``y = x @ W_e^T``, the input gradient ``dx = dy @
W_e`` (FP8: against a K-major copy of W^T) and the weight gradient ``dW_e
= dy_e^T x_e`` (FP8 into bf16 as the baseline's, and into float32 as
training keeps it), with even counts (every expert 1536 rows) and with
uneven ones (every expert's first row off a multiple of 16; the FP8
weight gradient's operands, tile-padded, stay aligned all the same). FP8
operands are quantised beforehand, as a training step keeps them; the
timings are the products alone, in CUDA graphs, medians. Each FP8 result
is first checked against bf16 ``_grouped_mm`` of the dequantised
operands: a relative error of 1% or more marks the row WRONG and fails
the run at the end.

Run on the device machine from the repository root:

    python3 benchmarks/fp8_gemm.py
"""
import argparse

import torch
from triton.testing import do_bench_cudagraph

from coom.fp8.grouped_gemm import (
    grouped_fp8_mm,
    grouped_fp8_mm_wgrad,
    tuned_configs,
)
from coom.fp8.scaling import (
    TILE,
    Grouping,
    dequantize,
    group_tile_starts,
    quantize,
    quantize_transposed,
)

SHAPES = ((1536, 1024), (512, 1536))  # (k in, n out) of W (e, n, k)
ROW_TILE, WEIGHT_BLOCK = Grouping(1, TILE), Grouping(TILE, TILE)


def uneven_counts(experts: int, rows: int) -> torch.Tensor:
    """rows +- rows / 4 per expert, the same total, and every expert's
    first row but the first off a multiple of 16."""
    half = torch.randint(-rows // 4, rows // 4 + 1, (experts // 2,))
    offsets = torch.cat([half, -half, torch.zeros(experts % 2, dtype=int)])
    counts = rows + offsets[torch.randperm(experts)]
    for e in range(1, experts):  # moves the first row of e alone
        if counts[:e].sum() % 16 == 0:
            counts[e - 1] += 1
            counts[e] -= 1
    return counts.cuda()


def outer_major(scales: torch.Tensor) -> torch.Tensor:
    """The same scales with stride (1, rows), as training passes them."""
    return scales.T.contiguous().T


def quantize_weights(w_enk: torch.Tensor):
    """E4M3 values (e, n, k) and 128 x 128 block scales (e, g, h)."""
    pairs = [quantize(w_nk, WEIGHT_BLOCK) for w_nk in w_enk]
    return (torch.stack([values for values, _ in pairs]),
            torch.stack([scales for _, scales in pairs]))


def dequantize_group_tiles(values_kc, scales_kj, counts_e):
    """x (t, k) in bf16 from quantize_transposed(x, counts_e), tile-padded,
    through each row's column rather than the kernel's walk."""
    rows = int(counts_e.sum())
    group_t = torch.repeat_interleave(
        torch.arange(len(counts_e), device=counts_e.device), counts_e)
    first_row_e = counts_e.cumsum(0) - counts_e
    column_t = (group_tile_starts(counts_e)[group_t] * TILE
                + torch.arange(rows, device=counts_e.device)
                - first_row_e[group_t])
    x_kt = values_kc[:, column_t].float() * scales_kj[:, column_t // TILE]
    return x_kt.T.contiguous().bfloat16()


def quantized(x, dy, w, counts_e):
    """The FP8 operands of the three products, each (values, scales) with
    activation scales of stride (1, rows) as training passes them, and
    the bf16 dequantised x, dy and w (forward and input gradient) and dy
    and x (weight gradient)."""
    x_q, x_s = quantize(x, ROW_TILE)
    dy_q, dy_s = quantize(dy, ROW_TILE)
    w_q, w_s = quantize_weights(w)
    dyt_q, dyt_s = quantize_transposed(dy, counts_e)
    xt_q, xt_s = quantize_transposed(x, counts_e)
    fp8 = {"x": (x_q, outer_major(x_s)), "dy": (dy_q, outer_major(dy_s)),
           "w": (w_q, w_s),
           "w^T": (w_q.transpose(1, 2).contiguous(), w_s.transpose(1, 2)),
           "dy^T": (dyt_q, outer_major(dyt_s)),
           "x^T": (xt_q, outer_major(xt_s))}
    dequantized = (
        dequantize(x_q, x_s, ROW_TILE).bfloat16(),
        dequantize(dy_q, dy_s, ROW_TILE).bfloat16(),
        torch.stack([dequantize(values, scales, WEIGHT_BLOCK)
                     for values, scales in zip(w_q, w_s)]).bfloat16(),
        dequantize_group_tiles(dyt_q, dyt_s, counts_e),
        dequantize_group_tiles(xt_q, xt_s, counts_e))
    return fp8, dequantized


def products(k: int, n: int, counts_e: torch.Tensor):
    """(name, bf16 function, FP8 function, bf16 function of the
    dequantised FP8 operands) of the three products."""
    rows, experts = int(counts_e.sum()), len(counts_e)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(experts, n, k, device="cuda") / k ** 0.5).bfloat16()
    offs = counts_e.cumsum(0).to(torch.int32)
    fp8, (x_d, dy_d, w_d, dy_w, x_w) = quantized(x, dy, w, counts_e)

    def wgrad(out_dtype):
        return lambda: grouped_fp8_mm_wgrad(*fp8["dy^T"], *fp8["x^T"],
                                            counts_e, out_dtype=out_dtype)
    bf16_wgrad = (lambda: torch._grouped_mm(dy.t(), x, offs=offs),
                  lambda: torch._grouped_mm(dy_w.t(), x_w, offs=offs))
    return [
        ("forward",
         lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
         lambda: grouped_fp8_mm(*fp8["x"], *fp8["w"], counts_e),
         lambda: torch._grouped_mm(x_d, w_d.transpose(-2, -1), offs=offs)),
        ("input grad", lambda: torch._grouped_mm(dy, w, offs=offs),
         lambda: grouped_fp8_mm(*fp8["dy"], *fp8["w^T"], counts_e),
         lambda: torch._grouped_mm(dy_d, w_d, offs=offs)),
        ("weight grad, bf16 out", bf16_wgrad[0], wgrad(torch.bfloat16),
         bf16_wgrad[1]),
        ("weight grad, fp32 out", bf16_wgrad[0], wgrad(torch.float32),
         bf16_wgrad[1]),
    ]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1536,
                        help="rows (token copies) per expert")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, {args.experts} experts x "
          f"{args.rows} rows\n")
    print("| layer k -> n | product | counts | bf16 TFLOP/s | FP8 TFLOP/s "
          "| speedup | FP8 error |")
    print("|---|---|---|---:|---:|---:|---:|")
    even = torch.full((args.experts,), args.rows, device="cuda")
    wrong = 0
    for k, n in SHAPES:
        for label, counts_e in (("even", even),
                                ("uneven", uneven_counts(args.experts,
                                                         args.rows))):
            flop = 2 * int(counts_e.sum()) * k * n
            for name, bf16, fp8, reference in products(k, n, counts_e):
                error = relative_error(fp8(), reference())
                wrong += error >= 1e-2
                bf16_ms, fp8_ms = (do_bench_cudagraph(function,
                                                      return_mode="median")
                                   for function in (bf16, fp8))
                print(f"| {k} -> {n} | {name} | {label} "
                      f"| {flop / bf16_ms / 1e9:,.0f} "
                      f"| {flop / fp8_ms / 1e9:,.0f} "
                      f"| {bf16_ms / fp8_ms:.2f}x | {error:.4f}"
                      f"{' WRONG' if error >= 1e-2 else ''} |", flush=True)
    print("\nautotuned configs:")
    for kernel, picks in tuned_configs().items():
        for key, config in picks.items():
            print(f"  {kernel} {key}: {config}")
    if wrong:
        raise SystemExit(f"{wrong} FP8 results off their reference by 1% "
                         "or more (WRONG above)")


if __name__ == "__main__":
    main()
