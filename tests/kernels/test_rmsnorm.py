"""Triton RMSNorm against a float64 reference (interpreted on CPU)."""
import pytest
import torch

from coom.kernels.rmsnorm import add_rms_norm, rms_norm
from tests.kernels import (
    BOUND,
    DEVICE,
    reference_and_fused,
    relative_error,
)


def _reference(h, weight, eps):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(5, 123), (123, 5), (37, 1000)])
def test_rms_norm_forward_and_backward(rows, width, dtype):
    torch.manual_seed(rows * width)
    x = (torch.randn(rows, width, device=DEVICE) * 3).to(dtype)
    x.requires_grad_()
    weight = torch.randn(width, device=DEVICE, requires_grad=True)
    dy = torch.randn(rows, width, device=DEVICE).to(dtype)
    y = rms_norm(x, weight, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = _reference(x64, w64, 1e-6)
    ref.backward(dy.double())
    assert relative_error(y, ref) < BOUND[dtype]
    assert relative_error(x.grad, x64.grad) < BOUND[dtype]
    assert relative_error(weight.grad, w64.grad) < BOUND[dtype]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_forward_and_backward(x_dtype):
    torch.manual_seed(0)
    rows, width = 123, 257
    residual = torch.randn(rows, width, device=DEVICE, requires_grad=True)
    x = torch.randn(rows, width, device=DEVICE).to(x_dtype).requires_grad_()
    weight = torch.randn(width, device=DEVICE, requires_grad=True)
    h, y = add_rms_norm(x, residual, weight, 1e-5)
    assert h.dtype == y.dtype == torch.float32
    dh, dy = torch.randn_like(h), torch.randn_like(y)
    torch.autograd.backward([h, y], [dh, dy])

    leaves = [t.detach().double().requires_grad_()
              for t in (x, residual, weight)]
    h64 = leaves[0] + leaves[1]
    y64 = _reference(h64, leaves[2], 1e-5)
    torch.autograd.backward([h64, y64], [dh.double(), dy.double()])
    assert relative_error(h, h64) < 1e-6
    assert relative_error(y, y64) < 1e-5
    assert x.grad.dtype == x_dtype
    bound = BOUND[x_dtype]
    for ours, ref in zip((x.grad, residual.grad, weight.grad), leaves):
        assert relative_error(ours, ref.grad) < bound


def test_rms_norm_keeps_leading_dimensions_and_empty_input():
    x = torch.randn(2, 3, 16, device=DEVICE)
    weight = torch.ones(16, device=DEVICE)
    assert rms_norm(x, weight, 1e-6).shape == (2, 3, 16)
    assert rms_norm(x[:, :0], weight, 1e-6).shape == (2, 0, 16)


def test_model_with_the_kernels_matches_the_reference():
    """The whole model, forward and backward, with its kernels
    (interpreted on CPU) against its reference path."""
    from coom.config import ModelConfig
    from coom.models import Transformer
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2,
                         num_attention_heads=2, ffn_hidden_size=48,
                         n_routed_experts=4, mtp_num_layers=1)

    def build(fused):
        model = Transformer(config, fused)
        model.init_weights()
        return model
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 9), device=DEVICE)
    results = []
    for model in reference_and_fused(build):
        losses = model(tokens, labels_bs=tokens)
        losses.sum().backward()
        results.append([losses, *(p.grad for p in model.parameters())])
    for ours, ref in zip(*results):
        assert relative_error(ours, ref) < 1e-5


def test_rms_norm_reads_rows_of_a_wider_tensor():
    """A split of a projection's output: rows are not width apart."""
    torch.manual_seed(1)
    wide = torch.randn(3, 7, 40, device=DEVICE, requires_grad=True)
    weight = torch.randn(24, device=DEVICE, requires_grad=True)
    part = wide.split([24, 16], dim=-1)[0]
    dy = torch.randn(3, 7, 24, device=DEVICE)
    rms_norm(part, weight, 1e-6).backward(dy)
    wide64 = wide.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    _reference(wide64[..., :24], w64, 1e-6).backward(dy.double())
    assert relative_error(wide.grad, wide64.grad) < 1e-5
    assert relative_error(weight.grad, w64.grad) < 1e-5
