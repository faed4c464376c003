"""Per-kernel timings on the GPU: COOM's Triton kernels (RMSNorm, SwiGLU,
RoPE, permute and combine, router top-k) against the plain PyTorch
reference, eager and under torch.compile, with the achieved bandwidth
against a measured device-to-device copy; the fused linear +
cross-entropy's time and peak memory against the unfused loss; and the
FP8 quantisation kernels' bandwidth at each warp count.

Memory-bound kernels are timed inside a CUDA graph (the kernels' own time,
without Python's launch overhead, which a compiled training step does not
pay either); where capture fails the line says "eager launch".

Run on the device machine from the repository root:

    python3 benchmarks/kernels.py [--only rms_norm swiglu ... fp8_quantize]
"""
import argparse

import torch
from triton.testing import do_bench, do_bench_cudagraph

from coom.fp8 import quantize as fp8_quantize
from coom.kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from coom.kernels.permute import copy_positions, permute, unpermute
from coom.kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_reference
from coom.kernels.rope import rotate, rotate_reference
from coom.kernels.router import route, route_reference
from coom.kernels.swiglu import swiglu, swiglu_reference

ROWS, WIDTH = 4 * 4096, 1536  # the small preset's batch 4 x 4096 tokens


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, read + written.
    """
    source = torch.randn(512 * 2 ** 20 // 4, device="cuda")
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source), return_mode="median")
    return 2 * source.nbytes / (ms / 1e3)


def timed(function) -> tuple[float, str]:
    """Median milliseconds of function, and how it was timed."""
    try:
        return do_bench_cudagraph(function, return_mode="median"), "graph"
    except Exception as error:  # capture refused: time with launches
        torch.cuda.synchronize()
        reason = str(error).splitlines()[0][:60]
        return (do_bench(function, return_mode="median"),
                f"eager launch: {reason}")


def forward_backward(function, inputs, extra):
    """Forward and backward of function, the output gradients made once.
    """
    outputs = function(*inputs, *extra)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gradients = [torch.ones_like(output) for output in outputs]

    def run():
        for tensor in inputs:
            tensor.grad = None
        outputs = function(*inputs, *extra)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs, gradients)
    return run


def report(name, variants, nbytes_forward, nbytes_both, bandwidth):
    """variants: (label, function, differentiable inputs, other args)."""
    print(f"\n{name}")
    for label, function, inputs, extra in variants:
        forward, how = timed(lambda: function(*inputs, *extra))
        both, how_both = timed(forward_backward(function, inputs, extra))
        note = "" if how == how_both == "graph" else f"  [{how_both}]"
        print(f"  {label:14s} forward {forward * 1e3:7.1f} us "
              f"({nbytes_forward / forward / 1e9 / bandwidth * 1e12:4.0%}"
              f" of copy)  forward+backward {both * 1e3:7.1f} us "
              f"({nbytes_both / both / 1e9 / bandwidth * 1e12:4.0%})"
              f"{note}")


def add_rms_norm_reference(x, residual, weight, eps):
    h = residual + x
    return h, rms_norm_reference(h, weight, eps)


def rms_norm_benchmarks(bandwidth: float) -> None:
    weight = torch.randn(WIDTH, device="cuda", requires_grad=True)
    compiled_norm = torch.compile(rms_norm_reference)
    compiled_add = torch.compile(add_rms_norm_reference)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(ROWS, WIDTH, device="cuda", dtype=dtype,
                        requires_grad=True)
        size = x.element_size() * ROWS * WIDTH
        # forward: read x, write y; backward: read dy and x, write dx
        report(f"RMSNorm {ROWS} x {WIDTH} {dtype}",
               [(label, function, (x, weight), (1e-6,))
                for label, function in (
                    ("triton", rms_norm), ("torch eager", rms_norm_reference),
                    ("torch.compile", compiled_norm))],
               2 * size, 5 * size, bandwidth)
    x = torch.randn(ROWS, WIDTH, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    residual = torch.randn(ROWS, WIDTH, device="cuda", requires_grad=True)
    half, full = 2 * ROWS * WIDTH, 4 * ROWS * WIDTH
    # forward: read x and residual, write h and y; backward: read dy, dh
    # and h, write dx and dresidual
    report("residual add + RMSNorm, bf16 branch into fp32 stream",
           [(label, function, (x, residual, weight), (1e-6,))
            for label, function in (
                ("triton", add_rms_norm),
                ("torch eager", add_rms_norm_reference),
                ("torch.compile", compiled_add))],
           half + 3 * full, half + 3 * full + 3 * full + half + full,
           bandwidth)


def with_compiled(kernel, reference):
    """(label, function) of the kernel, eager PyTorch and compiled."""
    return [("triton", kernel), ("torch eager", reference),
            ("torch.compile", torch.compile(reference))]


def swiglu_benchmarks(bandwidth: float) -> None:
    # the dense MLP's gating (tokens x ffn) and the experts' (copies x i)
    for rows, width in ((ROWS, 4096), (6 * ROWS, 512)):
        gate, up = (torch.randn(rows, width, device="cuda",
                                dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
        size = gate.numel() * gate.element_size()
        # forward: read gate and up, write y; backward: read dy, gate and
        # up, write dgate and dup
        report(f"SwiGLU gating {rows} x {width} bf16",
               [(label, function, (gate, up), ())
                for label, function in with_compiled(swiglu,
                                                     swiglu_reference)],
               3 * size, 8 * size, bandwidth)


def rope_benchmarks(bandwidth: float) -> None:
    positions, half = 4096, 32
    angles = torch.rand(positions, half, device="cuda") * 6
    cos, sin = angles.cos(), angles.sin()
    # MLA's query rope channels: 64 of each head's 192, 12 heads
    q = torch.randn(4, positions, 12, 192, device="cuda",
                    dtype=torch.bfloat16)
    q_pe = q[..., 128:].requires_grad_()
    size = q_pe.numel() * q_pe.element_size()
    report("RoPE, query rope channels (4, 4096, 12, 64 of 192) bf16",
           [(label, function, (q_pe,), (cos, sin, 0))
            for label, function in with_compiled(rotate, rotate_reference)],
           2 * size, 4 * size, bandwidth)


def gather_reference(x_td, token_c):
    return x_td[token_c]


def combine_reference(y_cd, weights_tk, order_c):
    token_c = order_c // weights_tk.shape[1]
    weights_c = weights_tk.flatten()[order_c]
    y_cd = y_cd * weights_c[:, None].to(y_cd.dtype)
    return torch.zeros(ROWS, y_cd.shape[1], device="cuda",
                       dtype=y_cd.dtype).index_add_(0, token_c, y_cd)


def permute_benchmarks(bandwidth: float, experts: int = 64,
                       k: int = 6) -> None:
    x = torch.randn(ROWS, WIDTH, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    experts_tk = torch.rand(ROWS, experts, device="cuda").topk(k).indices
    order_c = experts_tk.flatten().argsort(stable=True)
    copy_tk, token_c = copy_positions(order_c, k), order_c // k
    weights_tk = torch.rand(ROWS, k, device="cuda", requires_grad=True)
    row = WIDTH * x.element_size()
    one, copies = ROWS * row, ROWS * k * row
    report(f"permute {ROWS} tokens x {k} copies x {WIDTH} bf16",
           [("triton", permute, (x,), (copy_tk,)),
            ("torch eager", gather_reference, (x,), (token_c,)),
            ("torch.compile", torch.compile(gather_reference), (x,),
             (token_c,))],
           one + copies, 2 * (one + copies), bandwidth)
    y = torch.randn(ROWS * k, WIDTH, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    report("combine (weighted unpermute), same sizes",
           [("triton", unpermute, (y, weights_tk), (copy_tk,)),
            ("torch eager", combine_reference, (y, weights_tk), (order_c,)),
            ("torch.compile", torch.compile(combine_reference),
             (y, weights_tk), (order_c,))],
           one + copies, one + copies + one + 2 * copies, bandwidth)


def router_benchmarks() -> None:
    """Top-k after the router matmul: the small preset's 64 experts, and
    DeepSeek-V3's 256 in 8 groups (top 4 groups, 8 experts)."""
    for experts, k, groups, top_groups in ((64, 6, 1, 1), (256, 8, 8, 4)):
        print(f"\nrouter top-{k} of {experts} experts, {groups} groups, "
              f"{ROWS} tokens, float32 logits")
        logits = torch.randn(ROWS, experts, device="cuda",
                             requires_grad=True)
        bias = torch.randn(experts, device="cuda") * 0.01
        settings = (bias, k, "sigmoid", groups, top_groups, "noaux_tc", True,
                    2.5)
        for label, function in with_compiled(route, route_reference):
            forward, _ = timed(lambda: function(logits, *settings))

            def both():
                logits.grad = None
                scores, weights, _ = function(logits, *settings)
                (scores.sum() + weights.sum()).backward()
            total, how = timed(both)
            note = "" if how == "graph" else f"  [{how}]"
            print(f"  {label:14s} forward {forward * 1e3:7.1f} us  "
                  f"forward+backward {total * 1e3:7.1f} us{note}")


def cross_entropy_benchmark(tokens: int = 8192, vocab: int = 129280,
                            width: int = WIDTH) -> None:
    """Peak memory and time of the loss, forward + backward, bf16
    autocast, float32 weights and features as in training."""
    print(f"\nlinear + cross-entropy, {tokens} tokens, vocabulary {vocab}, "
          f"width {width}, bf16 autocast")
    x = torch.randn(tokens, width, device="cuda", requires_grad=True)
    weight = (torch.randn(vocab, width, device="cuda") / width ** 0.5
              ).requires_grad_()
    labels = torch.randint(vocab, (tokens,), device="cuda")
    scale = torch.full((tokens,), 1 / tokens, device="cuda")

    def step(loss_function):
        def run():
            x.grad = weight.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_function(x, weight, labels, scale)
            loss.backward()
            return loss
        return run

    figures = {}
    compiled = torch.compile(linear_cross_entropy_reference)
    for label, function in (("fused (triton)", linear_cross_entropy),
                            ("unfused eager", linear_cross_entropy_reference),
                            ("unfused compile", compiled)):
        run = step(function)
        loss = run().item()
        x.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        # what the loss needs beyond its inputs, gradients included
        peak = torch.cuda.max_memory_allocated() - before
        ms = do_bench(run, return_mode="median")
        figures[label] = (peak, ms)
        print(f"  {label:16s} loss {loss:.5f}  peak {peak / 2 ** 30:6.2f} "
              f"GiB  forward+backward {ms:7.2f} ms")
    fused_peak, fused_ms = figures["fused (triton)"]
    unfused_peak, unfused_ms = figures["unfused eager"]
    print(f"  fused vs unfused eager: {unfused_peak / fused_peak:.1f}x less "
          f"memory, {fused_ms / unfused_ms:.2f}x the time")


def fp8_quantize_benchmarks(bandwidth: float,
                            warps: tuple[int, ...] = (4, 8, 16)) -> None:
    """The FP8 quantisation kernels at the small preset's sizes, bytes
    read and written against the copy, at each warp count."""
    experts, rows_per_expert = 64, 1536
    counts_e = torch.full((experts,), rows_per_expert, device="cuda")
    x_f32 = torch.randn(ROWS, WIDTH, device="cuda")
    x_bf16 = torch.randn(ROWS, 4096, device="cuda", dtype=torch.bfloat16)
    x_experts = torch.randn(experts * rows_per_expert, WIDTH, device="cuda",
                            dtype=torch.bfloat16)
    w_experts = torch.randn(experts, 1024, WIDTH, device="cuda")
    quantize = fp8_quantize.quantize_rows_and_transpose
    cases = [
        ("x 16384x1536 f32, rows + x^T", x_f32,
         lambda: quantize(x_f32, False)),
        ("x 16384x4096 bf16, rows + x^T", x_bf16,
         lambda: quantize(x_bf16, False)),
        ("experts' x 98304x1536 bf16, rows + grouped x^T", x_experts,
         lambda: quantize(x_experts, False, counts_e)),
        ("expert weights 64x1024x1536 f32, blocks + W^T", w_experts,
         lambda: fp8_quantize.quantize_blocks(w_experts, transpose=True)),
    ]
    print("\nFP8 quantisation (one pass: values and the transposed copy)")
    default = fp8_quantize.NUM_WARPS
    try:
        for label, source, function in cases:
            nbytes = source.nbytes + 2 * source.numel()  # two E4M3 copies
            for count in warps:
                fp8_quantize.NUM_WARPS = count
                ms, how = timed(function)
                share = nbytes / (ms / 1e3) / bandwidth
                print(f"  {label:48s} {count:2d} warps {ms * 1e3:7.1f} us "
                      f"({share:4.0%} of copy) [{how}]")
    finally:
        fp8_quantize.NUM_WARPS = default


SECTIONS = {
    "rms_norm": rms_norm_benchmarks,
    "swiglu": swiglu_benchmarks,
    "rope": rope_benchmarks,
    "permute": permute_benchmarks,
    "router": lambda bandwidth: router_benchmarks(),
    "cross_entropy": lambda bandwidth: cross_entropy_benchmark(),
    "fp8_quantize": fp8_quantize_benchmarks,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS),
                        default=list(SECTIONS))
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} "
          "TB/s (read + write)")
    for name in args.only:
        SECTIONS[name](bandwidth)


if __name__ == "__main__":
    main()
