"""Per-kernel timings on the GPU: COOM's Triton kernels against the plain
PyTorch reference, eager and under torch.compile, with the achieved
bandwidth against a measured device-to-device copy; and the fused linear +
cross-entropy's time and peak memory against the unfused loss.

Memory-bound kernels are timed inside a CUDA graph (the kernels' own time,
without Python's launch overhead, which a compiled training step does not
pay either); where capture fails the line says "eager launch".

Run on the device machine from the repository root:

    python3 benchmarks/kernels.py
"""
import torch
from triton.testing import do_bench, do_bench_cudagraph

from coom.kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from coom.kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_reference

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
    except Exception:  # capture refused: time with launches
        torch.cuda.synchronize()
        return do_bench(function, return_mode="median"), "eager launch"


def forward_backward(function, inputs, extra):
    def run():
        for tensor in inputs:
            tensor.grad = None
        outputs = function(*inputs, *extra)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs,
                                [torch.ones_like(o) for o in outputs])
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


def main() -> None:
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} "
          "TB/s (read + write)")
    rms_norm_benchmarks(bandwidth)
    cross_entropy_benchmark()


if __name__ == "__main__":
    main()
