"""Triton SwiGLU gating against a float64 reference (interpreted on CPU).
"""
import pytest
import torch

from coom.kernels.swiglu import swiglu
from tests.kernels import (
    BOUND,
    DEVICE,
    reference_and_fused,
    relative_error,
)


def _inputs(shape, dtype):
    gate = (torch.randn(shape, device=DEVICE) * 4).to(dtype)
    up = torch.randn(shape, device=DEVICE).to(dtype)
    return gate.requires_grad_(), up.requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5), (3, 41), (2, 4, 125),
                                   (7, 1001)])
def test_swiglu_forward_and_backward(shape, dtype):
    torch.manual_seed(sum(shape))
    gate, up = _inputs(shape, dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    y = swiglu(gate, up)
    assert y.dtype == dtype and y.shape == gate.shape
    y.backward(dy)
    assert gate.grad.dtype == up.grad.dtype == dtype

    gate64, up64 = (t.detach().double().requires_grad_() for t in (gate, up))
    ref = torch.nn.functional.silu(gate64) * up64
    ref.backward(dy.double())
    assert relative_error(y, ref) < BOUND[dtype]
    assert relative_error(gate.grad, gate64.grad) < BOUND[dtype]
    assert relative_error(up.grad, up64.grad) < BOUND[dtype]


def test_swiglu_of_empty_input():
    for shape in [(0, 16), (3, 0, 8)]:
        gate, up = _inputs(shape, torch.float32)
        y = swiglu(gate, up)
        assert y.shape == shape
        y.sum().backward()
        assert gate.grad.shape == up.grad.shape == shape


def test_swiglu_passes_opcheck_and_compiles():
    """Fake implementation and autograd as torch.compile needs them."""
    gate, up = _inputs((3, 41), torch.float32)
    torch.library.opcheck(swiglu, (gate, up))
    compiled = torch.compile(swiglu, fullgraph=True, backend="aot_eager")
    compiled(gate, up).sum().backward()
    expected = gate.grad.clone()
    gate.grad = None
    swiglu(gate, up).sum().backward()
    assert torch.equal(gate.grad, expected)


def test_swiglu_layer_with_the_kernel_matches_the_reference():
    from coom.layers import mlp
    torch.manual_seed(0)
    x = torch.randn(3, 7, 24, device=DEVICE)

    def build(fused):
        layer = mlp.SwiGLU(24, 40, fused)
        layer.init_weights(std=0.5, num_layers=2)
        return layer
    results = []
    for layer in reference_and_fused(build):
        y = layer(x)
        y.square().mean().backward()
        results.append([y, *(p.grad for p in layer.parameters())])
    for ours, ref in zip(*results):
        assert relative_error(ours, ref) < 1e-5
