"""FP8 weights quantised once per optimizer step (``coom.fp8.weights``),
emulated on the CPU: a step of 4 micro-batches quantises each weight
once, before its forwards, and no forward quantises it again; a second
evaluation after it quantises nothing; a weight changed outside the
optimizer is quantised again alone; a step of one micro-batch keeps
none; and a run that keeps the forms
computes what one that makes them in every forward computes, bit for
bit."""
import pytest
import torch

from coom.config import load_config
from coom.fp8 import linear
from coom.fp8.grouped import fp8_grouped_linear, grouped_weight_forms
from coom.fp8.linear import FP8Recipe, fp8_linears, weight_forms
from coom.fp8.weights import KeptForms
from coom.parallel import model as parallel_model
from coom.train.trainer import Trainer
from tests.kernels import DEVICE
from tests.parallel.test_precision import OVERRIDES

FP8 = ["fp8.recipe=blockwise", "fp8.emulate=true"]


def _trainer(path, precision: str) -> Trainer:
    return Trainer(load_config("tiny", [*OVERRIDES, *FP8,
                                        f"train.precision={precision}"]),
                   path)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_weights_are_quantised_once_a_step(tmp_path, monkeypatch,
                                           precision):
    trainer = _trainer(tmp_path, precision)
    kept = [module for module in trainer.model.modules()
            if isinstance(module, KeptForms)]
    assert len(kept) > 10
    made, in_forwards = [], []
    refresh, forms = KeptForms.refresh, linear.emulated_weight_forms
    monkeypatch.setattr(KeptForms, "refresh", lambda self, weight: (
        made.append(refresh(self, weight)) or made[-1]))
    monkeypatch.setattr(linear, "emulated_weight_forms", lambda *args: (
        in_forwards.append(args) or forms(*args)))
    for _ in range(2):
        made.clear()
        trainer.train_step()
        assert sum(made) == len(kept) and not in_forwards
    # The last step's optimizer changed every weight; a second
    # evaluation finds them as the first left them.
    for remade in (len(kept), 0):
        made.clear()
        trainer.evaluate(trainer.data.valid)
        assert sum(made) == remade
    with torch.no_grad():
        trainer.model.layers["1"].attention.wo.weight.mul_(2.0)
    trainer.evaluate(trainer.data.valid)
    assert sum(made) == 1
    assert all(module.count for module in kept)


def test_a_step_of_one_micro_batch_keeps_no_forms(tmp_path):
    """With nothing to share the forms between, they would only hold
    memory: the products make them in their forward."""
    config = load_config("tiny", [*OVERRIDES, *FP8,
                                  "train.global_batch_size=1"])
    trainer = Trainer(config, tmp_path)
    trainer.train_step()
    trainer.evaluate(trainer.data.valid)
    assert not any(module.count for module in trainer.model.modules()
                   if isinstance(module, KeptForms))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kept_forms_compute_what_forwards_would(tmp_path, monkeypatch,
                                                precision):
    kept = _trainer(tmp_path / "kept", precision)
    losses = [kept.train_step()["loss"] for _ in range(3)]
    monkeypatch.setattr(parallel_model, "refresh_kept", lambda model: 0)
    made = _trainer(tmp_path / "made", precision)
    assert [made.train_step()["loss"] for _ in range(3)] == losses
    assert not any(module.count for module in made.model.modules()
                   if isinstance(module, KeptForms))
    ours = dict(made.model.named_parameters())
    for name, parameter in kept.model.named_parameters():
        assert torch.equal(parameter, ours[name]), name


def _products(function, x, weight, dy, forms):
    """function's output and the gradients of x and weight."""
    x, weight = (tensor.clone().requires_grad_() for tensor in (x, weight))
    (y,) = function(x, weight, forms)
    y.backward(dy)
    return y, x.grad, weight.grad


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="cuBLAS's FP8 product: run by .ci/gpu-tests")
def test_kept_forms_give_cublas_the_same_products():
    """The dense linear (cuBLAS) given kept forms returns what it
    returns making the forms itself, bit for bit."""
    recipe = FP8Recipe("blockwise")
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    x, dy = torch.randn(300, 512, **cuda), torch.randn(300, 384, **cuda)
    weight = torch.randn(384, 512, **cuda) / 20

    def dense(x, w, forms):
        return fp8_linears(x, [w], recipe, forms)

    made = _products(dense, x, weight, dy, ())
    kept = _products(dense, x, weight, dy,
                     [weight_forms(weight, "blockwise", False)])
    assert all(torch.equal(a, b) for a, b in zip(made, kept))


def test_kept_forms_give_the_grouped_kernels_the_same_products():
    """The experts' grouped products (COOM's kernels, interpreted on the
    CPU) given kept forms return what they return making the forms
    themselves, bit for bit."""
    recipe = FP8Recipe("blockwise")
    generator = torch.Generator().manual_seed(5)
    x, dy = (torch.randn(300, k, generator=generator)
             .to(DEVICE, torch.bfloat16) for k in (256, 128))
    counts = torch.tensor([100, 0, 130, 70], device=DEVICE)
    experts = (torch.randn(4, 128, 256, generator=generator) / 16).to(
        DEVICE, torch.bfloat16)

    def grouped(x, w, forms):
        return fp8_grouped_linear(x, [w], counts, recipe, forms)

    made = _products(grouped, x, experts, dy, ())
    kept = _products(grouped, x, experts, dy,
                     [grouped_weight_forms(experts, recipe)])
    assert all(torch.equal(a, b) for a, b in zip(made, kept))
