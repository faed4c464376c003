"""Fused linear + cross-entropy against a float64 reference (interpreted
on CPU)."""
import contextlib

import pytest
import torch

from coom.kernels import cross_entropy
from coom.kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_forward,
    linear_cross_entropy_reference,
)
from tests.kernels import DEVICE, OPS, relative_error


def _inputs(tokens, vocab, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=generator) * 2
    weight = torch.randn(vocab, width, generator=generator) / width ** 0.5
    labels = torch.randint(vocab, (tokens,), generator=generator)
    scale = torch.rand(tokens, generator=generator)
    scale[::3] = 0  # masked tokens
    return [t.to(DEVICE) for t in (x, weight, labels, scale)]


def _reference(x, weight, labels, scale):
    """Loss and gradients in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    loss = linear_cross_entropy_reference(x64, w64, labels, scale.double())
    loss.backward()
    return loss, x64.grad, w64.grad


@pytest.mark.parametrize("tokens, vocab, width, rows", [
    (5, 123, 16, 2), (123, 1000, 8, 50), (1000, 5, 32, 1000),
    (37, 5000, 12, 16)])
def test_loss_and_gradients_float32(tokens, vocab, width, rows, monkeypatch):
    """Chunks of `rows` tokens, vocabularies below, at and above the
    kernel's block, one row per program."""
    monkeypatch.setattr(cross_entropy, "chunk_rows", lambda *_: rows)
    x, weight, labels, scale = _inputs(tokens, vocab, width)
    x.requires_grad_()
    weight.requires_grad_()
    loss = linear_cross_entropy(x, weight, labels, scale)
    assert loss.dtype == torch.float32 and loss.shape == ()
    (2.5 * loss).backward()
    ref_loss, ref_dx, ref_dw = _reference(x, weight, labels, scale)
    assert relative_error(loss, ref_loss) < 1e-5
    assert relative_error(x.grad, 2.5 * ref_dx) < 1e-5
    assert relative_error(weight.grad, 2.5 * ref_dw) < 1e-5


def test_bfloat16_matmuls_under_autocast(monkeypatch):
    """Matmuls in bf16 as autocast asks, float32 gradients for float32
    leaves, within bf16's error of the float64 loss."""
    monkeypatch.setattr(cross_entropy, "chunk_rows", lambda *_: 32)
    x, weight, labels, scale = _inputs(100, 777, 64, seed=1)
    x.requires_grad_()
    weight.requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, weight, labels, scale)
    loss.backward()
    assert x.grad.dtype == weight.grad.dtype == torch.float32
    ref_loss, ref_dx, ref_dw = _reference(x, weight, labels, scale)
    assert relative_error(loss, ref_loss) < 1e-2
    assert relative_error(x.grad, ref_dx) < 1e-2
    assert relative_error(weight.grad, ref_dw) < 1e-2


def test_without_gradients_only_the_loss_is_computed():
    x, weight, labels, scale = _inputs(20, 50, 8)
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, labels, scale)
    ref_loss, _, _ = _reference(x, weight, labels, scale)
    assert relative_error(loss, ref_loss) < 1e-5
    _, grad_x, grad_w = linear_cross_entropy_forward(
        x, weight, labels, scale, torch.float32, 8, False)
    assert grad_x.numel() == grad_w.numel() == 0


def test_extreme_logits_stay_finite():
    """Logits of +-1e4: the running maximum keeps exp from overflowing."""
    x, weight, labels, scale = _inputs(9, 300, 4)
    weight = weight * 1e4
    x.requires_grad_()
    loss = linear_cross_entropy(x, weight, labels, scale)
    loss.backward()
    ref_loss, ref_dx, _ = _reference(x, weight, labels, scale)
    assert relative_error(loss, ref_loss) < 1e-5
    assert relative_error(x.grad, ref_dx) < 1e-5


def test_chunk_rows_bound_the_logits_held_at_once():
    assert cross_entropy.chunk_rows(129280, 2) == 2048
    assert cross_entropy.chunk_rows(32768, 2) == 8192
    assert cross_entropy.chunk_rows(10 ** 9, 4) == 128


def test_training_with_the_fused_loss_matches_the_reference(
        small_run, tmp_path):
    """Main and MTP losses, gradients and validation loss of a short
    float32 run with the fused kernels (interpreted on CPU for the loss,
    the others' CPU kernels) equal the unfused run's."""
    from coom.cli import main
    from coom.train.metrics import read_metrics

    def train(run_dir, fused):
        assert main(["train", "tiny", "--run-dir", str(run_dir), "--set",
                     *small_run, "train.steps=3", "train.precision=fp32",
                     "model.mtp_num_layers=1",
                     f"train.kernels={str(fused).lower()}"]) == 0
        return read_metrics(run_dir)

    reference = train(tmp_path / "reference", False)
    with contextlib.ExitStack() as stack:
        for op in OPS:
            if op is not cross_entropy.linear_cross_entropy_forward:
                stack.enter_context(op.set_kernel_enabled("cpu", True))
        fused = train(tmp_path / "fused", True)
    compared = 0
    for ours, theirs in zip(fused, reference):
        for key in ("loss", "mtp_loss", "grad_norm", "val_loss"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5)
                compared += 1
    assert compared >= 3 * 3 + 2
