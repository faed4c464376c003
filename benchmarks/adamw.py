"""The AdamW step of a preset's parameters on the GPU: COOM's one-launch
kernel (``coom.kernels.adamw``) at several block sizes and warp counts,
float32 and bf16 moments, against torch's fused AdamW (one
``_fused_adamw_`` over the same tensors, float32 gradients, no copies),
in milliseconds and in TB/s of the bytes each must move.

COOM's step reads a bf16 gradient and writes a bf16 copy: 28 bytes per
parameter with float32 moments, 20 with bf16 ones; torch's reads a
float32 gradient and writes no copy: 28 bytes too.

Run on the device machine from the repository root:

    python3 benchmarks/adamw.py [--recipe small]
"""
import argparse
import itertools

import torch
from triton.testing import do_bench

from coom.config import load_config
from coom.kernels import adamw
from coom.models.transformer import Transformer

SETTINGS = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8,
                weight_decay=0.1, step=10)


def parameter_shapes(recipe: str) -> list[tuple]:
    config = load_config(recipe, [])
    with torch.device("meta"):
        model = Transformer(config.model)
    return [tuple(p.shape) for p in model.parameters()]


def timed(step) -> float:
    """Median ms of step, several runs."""
    return do_bench(step, warmup=25, rep=200, return_mode="median")


def coom_ms(shapes, moments: torch.dtype, block: int, warps: int) -> float:
    params = [torch.randn(shape, device="cuda") for shape in shapes]
    operands = (
        params, [torch.randn_like(p, dtype=torch.bfloat16) for p in params],
        [torch.zeros_like(p, dtype=moments) for p in params],
        [torch.zeros_like(p, dtype=moments) for p in params],
        [torch.empty_like(p, dtype=torch.bfloat16) for p in params])
    adamw.BLOCK, adamw.NUM_WARPS = block, warps
    adamw._blocks.cache_clear()
    return timed(lambda: adamw.adamw_step(*operands, **SETTINGS))


def torch_ms(shapes) -> float:
    params = [torch.randn(shape, device="cuda") for shape in shapes]
    operands = (params, [torch.randn_like(p) for p in params],
                [torch.zeros_like(p) for p in params],
                [torch.zeros_like(p) for p in params], [],
                [torch.tensor(10.0, device="cuda") for _ in params])
    return timed(lambda: torch._fused_adamw_(
        *operands, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1,
        eps=1e-8, amsgrad=False, maximize=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--blocks", type=int, nargs="*",
                        default=[2048, 4096, 8192, 16384])
    parser.add_argument("--warps", type=int, nargs="*", default=[4, 8, 16])
    args = parser.parse_args()
    shapes = parameter_shapes(args.recipe)
    count = sum(torch.Size(shape).numel() for shape in shapes)
    print(f"{args.recipe}: {len(shapes)} tensors, {count / 1e9:.2f}B "
          f"parameters; {torch.cuda.get_device_name()}")

    def report(label: str, ms: float, bytes_per: int) -> None:
        torch.cuda.empty_cache()
        print(f"  {label:34s} {ms:7.2f} ms {count * bytes_per / ms / 1e9:6.2f}"
              f" TB/s", flush=True)

    report("torch _fused_adamw_ (fp32 grads)", torch_ms(shapes), 28)
    for moments, per in ((torch.float32, 28), (torch.bfloat16, 20)):
        for block, warps in itertools.product(args.blocks, args.warps):
            name = "bf16" if moments == torch.bfloat16 else "float32"
            report(f"coom, {name} moments, block {block} x {warps}",
                   coom_ms(shapes, moments, block, warps), per)


if __name__ == "__main__":
    main()
