"""``coom plan --calibrate``: the rates of this GPU, measured in seconds.

Each kind of work runs at a shape of the ``small`` preset at full scale
(``SCALE`` = 1): a dense product of 16,384 tokens by 1,536 x 4,096, the
routed experts' grouped product (6 copies of each token over 64 experts
of width 512), causal attention forward and backward (4 x 4,096 tokens,
12 heads, query and key width 192, value 128) and a 1 GiB copy; an
empty kernel gives the launch time. A smaller scale serves tests on a
CPU.
"""
import time

import torch
from torch.nn import functional

from coom.layers.mla import preferred_attention
from coom.plan.ceilings import Ceilings


def _seconds(work, device: torch.device, repeats: int = 10) -> float:
    """work's mean time over repeats, after two to warm up."""
    for _ in range(2):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / repeats


def _matmul(device, scale):
    tokens, width, out = 16384 // scale, 1536 // scale, 4096 // scale
    a = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
    b = torch.randn(width, out, device=device, dtype=torch.bfloat16)
    return (lambda: a @ b), 2 * tokens * width * out


def _grouped(device, scale):
    experts, width, inner = 64, 1536 // scale, 512 // scale
    rows = 6 * 16384 // scale
    x = torch.randn(rows, width, device=device, dtype=torch.bfloat16)
    w = torch.randn(experts, width, inner, device=device,
                    dtype=torch.bfloat16)
    offsets = torch.arange(1, experts + 1, device=device,
                           dtype=torch.int32) * (rows // experts)
    return (lambda: torch._grouped_mm(x, w, offs=offsets)), \
        2 * rows * width * inner


def _attention(device, scale):
    batch, heads, length = 4, 12 // min(scale, 12), 4096 // scale
    q, k = (torch.randn(batch, heads, length, 192, device=device,
                        dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    v = torch.randn(batch, heads, length, 128, device=device,
                    dtype=torch.bfloat16, requires_grad=True)

    def work():
        with preferred_attention():
            functional.scaled_dot_product_attention(
                q, k, v, is_causal=True).sum().backward()
    forward = 2 * batch * heads * length ** 2 * (192 + 128) / 2
    return work, 3.5 * forward  # the backward recomputes the scores


def _copy(device, scale):
    source = torch.empty(2 ** 29 // scale, device=device,
                         dtype=torch.bfloat16)
    target = torch.empty_like(source)
    return (lambda: target.copy_(source)), 2 * source.nbytes


def calibrate(gpu: str, device: torch.device, scale: int = 1) -> Ceilings:
    """The rates of device, measured at 1/scale of the shapes above."""
    rates = {}
    for kind, make in (("matmul", _matmul), ("grouped matmul", _grouped),
                       ("attention", _attention), ("memory", _copy)):
        work, amount = make(device, scale)
        rates[kind] = amount / _seconds(work, device)
    tiny = torch.zeros(1, device=device)
    launch = _seconds(lambda: tiny.add_(1), device, repeats=200)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" \
        else "CPU"
    return Ceilings(gpu, rates, launch, f"measured on {name} by coom "
                    f"plan --calibrate, {time.strftime('%Y-%m-%d')}")
