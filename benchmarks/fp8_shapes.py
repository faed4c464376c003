"""Which products FP8 speeds up, shape by shape: the table an FP8 filter
(issue 28) is made from.

For a recipe, every product that ``fp8.recipe=blockwise`` converts (each
FP8 linear's (n, k), the routed experts' gate-and-up and down products)
is timed whole, forward and backward, at the recipe's micro-batch of
tokens, against the same product in bf16:

- bf16: ``x @ W^T`` (for the experts ``grouped_matmul``, gate and up in
  two products as the bf16 experts run them, and the down product after
  the gating kernel), then its backward;
- FP8: ``fp8_linears`` / ``fp8_grouped_linear`` (the down product
  ``fp8_gated_grouped_linear``, the gating fused in) with the weights'
  forms kept, as a step keeps them (``coom.fp8.weights``), so x's and
  dy's quantisations count and W's do not; then its backward.

Each is timed in a CUDA graph (the kernels' own time, as a compiled step
pays it), median of ``do_bench_cudagraph``. The experts get the balanced
routing's rows: micro-batch tokens x top-k / experts each. Prints the
table and writes it as JSON to --out; with --kernels, also the kernels
of each expert product, bf16 and FP8, profiled.

Run on the device machine from the repository root:

    python3 benchmarks/fp8_shapes.py small medium --out fp8_shapes.json
"""
import argparse
import json

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench_cudagraph

from coom.config import load_config
from coom.fp8.grouped import (
    fp8_gated_grouped_linear,
    fp8_grouped_linear,
    grouped_weight_forms,
)
from coom.fp8.linear import FP8Recipe, fp8_linears, weight_forms
from coom.fp8.scaling import TILE
from coom.kernels.swiglu import swiglu
from coom.layers.moe import grouped_matmul
from coom.models.transformer import Transformer

RECIPE = FP8Recipe("blockwise")
BF16 = dict(device="cuda", dtype=torch.bfloat16)


def dense_shapes(config) -> set[tuple[int, int]]:
    """(n, k) of every linear that blockwise FP8 converts: whole
    128-column tiles both ways (``coom.fp8.convert``; the embedding,
    head and routers stay in bf16), from the model built on meta."""
    with torch.device("meta"):
        model = Transformer(config.model)
    return {(module.out_features, module.in_features)
            for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and "router" not in name
            and not name.startswith("head")
            and module.out_features % TILE == module.in_features % TILE
            == 0}


def _timed(step) -> float:
    return do_bench_cudagraph(step, return_mode="median")


def time_dense(m: int, n: int, k: int) -> tuple[float, float]:
    """ms of bf16 and of FP8 for y = x W^T and its backward."""
    x = torch.randn(m, k, **BF16, requires_grad=True)
    weight = (torch.randn(n, k, **BF16) / k ** 0.5).requires_grad_()
    dy = torch.randn(m, n, **BF16)
    forms = [weight_forms(weight.detach(), RECIPE.scaling, False)]

    def bf16():
        (x @ weight.T).backward(dy)

    def fp8():
        (y,) = fp8_linears(x, [weight], RECIPE, forms)
        y.backward(dy)

    return _timed(bf16), _timed(fp8)


def expert_steps(config, m: int) -> dict[str, tuple]:
    """The bf16 and the FP8 run, forward and backward, of the experts'
    gate-and-up products and of their gated down product (the gating
    included: FP8 fuses it into the quantisation of its output), at
    balanced routing, through COOM's own calls (``grouped_matmul`` in
    bf16)."""
    model = config.model
    experts, d, i = (model.n_routed_experts, model.hidden_size,
                     model.moe_intermediate_size)
    rows = m * model.num_experts_per_tok
    counts = torch.full((experts,), rows // experts, device="cuda")
    counts[: rows % experts] += 1

    def weight(n, k):
        return (torch.randn(experts, n, k, **BF16) / k ** 0.5) \
            .requires_grad_()

    x = torch.randn(rows, d, **BF16, requires_grad=True)
    gate, up = (torch.randn(rows, i, **BF16, requires_grad=True)
                for _ in range(2))
    w1, w3, w2 = weight(i, d), weight(i, d), weight(d, i)
    forms = [grouped_weight_forms(w.detach(), RECIPE) for w in (w1, w3, w2)]
    dys = [torch.randn(rows, i, **BF16) for _ in range(2)]
    dy = torch.randn(rows, d, **BF16)

    def gate_and_up(products):
        def step():
            torch.autograd.backward(products(), dys)
        return step

    def down(product):
        def step():
            product().backward(dy)
        return step

    return {
        f"experts gate+up ({d} -> 2 x {i})": (
            gate_and_up(lambda: [grouped_matmul(x, w, counts)
                                 for w in (w1, w3)]),
            gate_and_up(lambda: fp8_grouped_linear(
                x, [w1, w3], counts, RECIPE, forms[:2]))),
        f"experts gated down ({i} -> {d})": (
            down(lambda: grouped_matmul(swiglu(gate, up), w2, counts)),
            down(lambda: fp8_gated_grouped_linear(
                gate, up, w2, counts, RECIPE, forms[2]))),
    }


def print_kernels(step, runs: int = 3) -> None:
    """The GPU kernels of one run of step, the longest first: ms and
    launches per run."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            step()
        torch.cuda.synchronize()
    kernels = [event for event in prof.key_averages()
               if event.device_type == DeviceType.CUDA]
    kernels.sort(key=lambda event: -event.self_device_time_total)
    for event in kernels:
        print(f"      {event.self_device_time_total / 1e3 / runs:7.3f} ms "
              f"{event.count // runs:3d}x  {event.key[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--out", default="fp8_shapes.json")
    parser.add_argument("--kernels", action="store_true",
                        help="also list each expert product's kernels")
    args = parser.parse_args()
    table = {}
    for recipe in args.recipes:
        config = load_config(recipe)
        m = config.train.micro_batch_size * config.data.seq_length
        rows = {f"linear {k} -> {n}": time_dense(m, n, k)
                for n, k in sorted(dense_shapes(config))}
        experts = expert_steps(config, m)
        rows |= {name: (_timed(bf16), _timed(fp8))
                 for name, (bf16, fp8) in experts.items()}
        print(f"{recipe}: {m} tokens a micro-batch")
        for name, (bf16, fp8) in rows.items():
            print(f"  {name:34s} bf16 {bf16:7.3f} ms  FP8 {fp8:7.3f} ms  "
                  f"{bf16 / fp8:5.2f}x")
            if args.kernels and name in experts:
                for precision, step in zip(("bf16", "FP8"),
                                           experts[name]):
                    print(f"    {precision} kernels:")
                    print_kernels(step)
        table[recipe] = {"tokens": m, "products": {
            name: {"bf16_ms": bf16, "fp8_ms": fp8}
            for name, (bf16, fp8) in rows.items()}}
    with open(args.out, "w") as file:
        json.dump(table, file, indent=1)


if __name__ == "__main__":
    main()
