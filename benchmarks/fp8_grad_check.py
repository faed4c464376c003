"""How far FP8 gradients fall from bf16's, parameter by parameter.

Trains a model in bf16 and, after each of the steps --check-at names (50
by default), loads the same weights into FP8 variants (by default the
emulation, exact quantise-dequantise in float32, and the FP8 matrix
units) and compares, batch by batch, each parameter's gradient with the
bf16 one: relative error ||g - g_bf16|| / ||g_bf16||; and the whole
gradient's relative error and cosine similarity, the loss protocol's
per-step fidelity check (docs/fp8.md). The emulation shows what FP8's
rounding costs; where the matrix units fall far beyond it, a kernel is
wrong.

Run on the device machine from the repository root:

    python3 benchmarks/fp8_grad_check.py --set model.num_layers=4 \
        --check-at 50 200 500
"""
import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from coom.config import load_config
from coom.fp8.linear import FP8Linear, FP8Recipe, fp8_linear
from coom.tools.bench import bench_config
from coom.train.trainer import Trainer

PRODUCTS = ("y", "dx", "dW")
VARIANTS = {
    "emulated": {"recipe": "blockwise", "emulate": True},
    "fp8": {"recipe": "blockwise", "filter": False},
}
"""Each FP8 variant converts every product it can: the check is of FP8's
numerics, not of the filter's choice."""


def gradients(trainer: Trainer, sample: int) -> dict[str, torch.Tensor]:
    """Each parameter's gradient of the loss of the micro-batch at sample
    (language model and MTP, as the trainer weighs them)."""
    batch = trainer.data.samples.batch(sample).to(trainer.device)
    with trainer.parallel.compute():
        losses = trainer.model(batch.tokens, labels_bs=batch.labels,
                               loss_mask_bs=batch.loss_mask)
    # The MoE layers' auxiliary losses join the backward themselves.
    main, mtp = losses[0], losses[1:]
    loss = main + 0.3 * mtp.mean() if len(mtp) else main
    loss.backward()
    weights = trainer.parallel.weights
    held = {name: parameter.grad if weights is None
            else weights.gradient(parameter)
            for name, parameter in trainer.model.named_parameters()}
    grads = {name: grad.float().clone() for name, grad in held.items()
             if grad is not None}
    # The compute copies may hold them (one micro-batch a step): the
    # optimizer drops them wherever they are.
    trainer.optimizer.zero_grad(set_to_none=True)
    for moe in trainer.model.moe_layers().values():
        moe.tokens_per_expert.zero_()  # no bias update between batches
        moe.aux_loss_sum.zero_()
    return grads


def capture_products(trainer: Trainer, sample: int) -> list[dict]:
    """(x, W, dy) of each FP8 linear in one forward and backward of the
    micro-batch at sample."""
    captured = []

    def keep(module, args, output):
        entry = {"name": names[module], "weight": module.weight.detach(),
                 "x": args[0].detach().flatten(0, -2).clone()}
        output.register_hook(lambda dy: entry.update(
            dy=dy.detach().flatten(0, -2).clone()))
        captured.append(entry)

    names = {module: name for name, module in trainer.model.named_modules()
             if isinstance(module, FP8Linear)}
    handles = [module.register_forward_hook(keep) for module in names]
    gradients(trainer, sample)
    for handle in handles:
        handle.remove()
    return captured


def run_product(product, x, weight, dy):
    """(y, dx, dW) of y = product(x, weight) with dy flowing back."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = product(x, weight)
    y.backward(dy.to(y.dtype))
    return y, x.grad, weight.grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def product_errors(entry: dict, recipe: FP8Recipe) -> str:
    """Relative errors of the FP8 units' and the emulation's y, dx and
    dW against float64, and the rows of dx the units get most wrong."""
    x, weight, dy = entry["x"], entry["weight"], entry["dy"]
    exact = run_product(lambda a, b: a @ b.T, x.double(), weight.double(),
                        dy.double())
    units = run_product(lambda a, b: fp8_linear(a, b, recipe), x, weight, dy)
    emulated = run_product(
        lambda a, b: fp8_linear(a, b, replace(recipe, emulate=True)),
        x.float(), weight, dy.float())
    row_errors = ((units[1].double() - exact[1]).norm(dim=1)
                  / exact[1].norm(dim=1).clamp(min=1e-30))
    worst = row_errors.topk(3)

    def errors(products):
        return "/".join(f"{relative_error(a, b):.4f}"
                        for a, b in zip(products, exact))

    rows = ", ".join(f"{row} ({error:.3f})" for error, row in
                     zip(worst.values.tolist(), worst.indices.tolist()))
    return (f"{entry['name']} {tuple(x.shape)} {x.dtype} -> "
            f"{tuple(dy.shape)} {dy.dtype}: units {errors(units)}, "
            f"emulated {errors(emulated)}, worst dx rows {rows}")


def norm(grads: dict[str, torch.Tensor]) -> float:
    return torch.stack([g.double().norm()
                        for g in grads.values()]).norm().item()


def trainer(config, run_dir: Path) -> Trainer:
    run_dir.mkdir(parents=True)
    return Trainer(config, run_dir)


def compare_gradients(reference: Trainer, variants: dict[str, Trainer],
                      batches: int, top: int) -> dict[str, list]:
    """For each of batches micro-batches after the reference's last
    step, every variant's whole gradient against bf16's: relative error
    and cosine similarity; prints them and the parameters it gets most
    wrong. Returns the cosines by variant."""
    step = reference.config.train.micro_batch_size
    cosines = {name: [] for name in variants}
    for batch in range(batches):
        sample = reference.consumed_samples + batch * step
        base = gradients(reference, sample)
        line = [f"batch {batch}: bf16 norm {norm(base):.3f}"]
        worst = {}
        for name, variant in variants.items():
            grads = gradients(variant, sample)
            errors = {key: ((grads[key] - g).norm() / g.norm()).item()
                      for key, g in base.items()}
            total = norm({key: grads[key] - g for key, g in base.items()}) \
                / norm(base)
            cosine = sum((grads[key].double() * g).sum()
                         for key, g in base.items()).item() \
                / (norm(grads) * norm(base))
            cosines[name].append(cosine)
            line.append(f"{name} norm {norm(grads):.3f} (error {total:.2%}"
                        f", cosine {cosine:.5f})")
            worst[name] = sorted(errors.items(), key=lambda item: -item[1])
        print(", ".join(line))
        for name, ranked in worst.items():
            print(f"  {name} worst: " + ", ".join(
                f"{key} {error:.2%}" for key, error in ranked[:top]))
    return cosines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    parser.add_argument("--check-at", type=int, nargs="+", default=[50],
                        help="bf16 steps after which the gradients are "
                        "compared")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    points = sorted(args.check_at)
    config = bench_config(load_config(args.recipe, args.overrides),
                          steps=points[-1], warmup=0, real_data=True)
    run_dir = Path(tempfile.mkdtemp())
    reference = trainer(config, run_dir / "bf16")
    variants = {name: trainer(replace(config, fp8=replace(
        config.fp8, **VARIANTS[name])), run_dir / name)
        for name in args.variants}
    summary = []
    for point in points:
        while reference.step < point:
            metrics = reference.train_step()
        print(f"bf16 after {point} steps: loss {metrics['loss']:.4f}, "
              f"grad norm {metrics['grad_norm']:.3f}")
        for variant in variants.values():
            variant.model.load_state_dict(reference.model.state_dict())
        if "fp8" in variants and point == points[0]:
            print(f"products (relative error of {'/'.join(PRODUCTS)} "
                  "against float64, batch 0):")
            for entry in capture_products(variants["fp8"],
                                          reference.consumed_samples):
                print("  " + product_errors(entry, FP8Recipe("blockwise")))
        cosines = compare_gradients(reference, variants, args.batches,
                                    args.top)
        summary += [f"step {point}, {name}: cosine against bf16 min "
                    f"{min(values):.5f}, mean {sum(values) / len(values):.5f}"
                    for name, values in cosines.items()]
    print("\n".join(summary))


if __name__ == "__main__":
    main()
