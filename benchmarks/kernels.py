"""Per-kernel timings on the GPU: COOM's Triton kernels against the plain
PyTorch reference, eager and under torch.compile, with the achieved
bandwidth against a measured device-to-device copy.

Run on the device machine from the repository root:

    python3 benchmarks/kernels.py
"""
import torch
from triton.testing import do_bench

from coom.kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_reference

ROWS, WIDTH = 4 * 4096, 1536  # the small preset's batch 4 x 4096 tokens


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, read + written.
    """
    source = torch.randn(512 * 2 ** 20 // 4, device="cuda")
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source), return_mode="median")
    return 2 * source.nbytes / (ms / 1e3)


def add_rms_norm_reference(x, residual, weight, eps):
    h = residual + x
    return h, rms_norm_reference(h, weight, eps)


def forward_backward(function, inputs, weight):
    def run():
        for tensor in (*inputs, weight):
            tensor.grad = None
        outputs = function(*inputs, weight, 1e-6)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs,
                                [torch.ones_like(o) for o in outputs])
    return run


def report(name, variants, nbytes_forward, nbytes_both, bandwidth):
    print(f"\n{name}")
    for label, function, inputs, weight in variants:
        forward = do_bench(lambda: function(*inputs, weight, 1e-6),
                           return_mode="median")
        both = do_bench(forward_backward(function, inputs, weight),
                        return_mode="median")
        print(f"  {label:18s} forward {forward * 1e3:7.1f} us "
              f"({nbytes_forward / forward / 1e9 / bandwidth * 1e12:4.0%}"
              f" of copy)  forward+backward {both * 1e3:7.1f} us "
              f"({nbytes_both / both / 1e9 / bandwidth * 1e12:4.0%})")


def main() -> None:
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} "
          "TB/s (read + write)")
    weight = torch.randn(WIDTH, device="cuda", requires_grad=True)
    compiled_norm = torch.compile(rms_norm_reference)
    compiled_add = torch.compile(add_rms_norm_reference)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(ROWS, WIDTH, device="cuda", dtype=dtype,
                        requires_grad=True)
        size = x.element_size() * ROWS * WIDTH
        # forward: read x, write y; backward: read dy and x, write dx
        report(f"RMSNorm {ROWS} x {WIDTH} {dtype}",
               [("triton", rms_norm, (x,), weight),
                ("torch eager", rms_norm_reference, (x,), weight),
                ("torch.compile", compiled_norm, (x,), weight)],
               2 * size, 5 * size, bandwidth)
    x = torch.randn(ROWS, WIDTH, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    residual = torch.randn(ROWS, WIDTH, device="cuda", requires_grad=True)
    half, full = 2 * ROWS * WIDTH, 4 * ROWS * WIDTH
    # forward: read x and residual, write h and y; backward: read dy, dh
    # and h, write dx and dresidual
    report("residual add + RMSNorm, bf16 branch into fp32 stream",
           [("triton", add_rms_norm, (x, residual), weight),
            ("torch eager", add_rms_norm_reference, (x, residual), weight),
            ("torch.compile", compiled_add, (x, residual), weight)],
           half + 3 * full, half + 3 * full + 3 * full + half + full,
           bandwidth)


if __name__ == "__main__":
    main()
