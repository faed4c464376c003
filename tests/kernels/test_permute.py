"""Triton token permutation and combine against a float64 reference
(interpreted on CPU), and the MoE layer with its kernels."""
import pytest
import torch

from coom.kernels.permute import (
    copy_positions,
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)
from tests.kernels import (
    BOUND,
    DEVICE,
    reference_and_fused,
    relative_error,
)


def _routing(tokens: int, experts: int, k: int):
    """(order_c, copy_tk) of a random routing of tokens to k experts."""
    experts_tk = torch.rand(tokens, experts, device=DEVICE).topk(k).indices
    order_c = experts_tk.flatten().argsort(stable=True)
    return order_c, copy_positions(order_c, k)


SHAPES = [(5, 40, 8, 2), (123, 257, 64, 6), (1000, 72, 64, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, width, experts, k", SHAPES)
def test_permute_forward_and_backward(tokens, width, experts, k, dtype):
    torch.manual_seed(tokens + width)
    order_c, copy_tk = _routing(tokens, experts, k)
    assert torch.equal(copy_tk.flatten()[order_c],
                       torch.arange(tokens * k, device=DEVICE))
    x = torch.randn(tokens, width, device=DEVICE).to(dtype)
    x.requires_grad_()
    x_cd = permute(x, copy_tk)
    assert torch.equal(x_cd, x[order_c // k])
    assert torch.equal(permute_reference(x, copy_tk), x_cd)
    dx_cd = torch.randn_like(x_cd)
    x_cd.backward(dx_cd)
    dx = torch.zeros(tokens, width, device=DEVICE, dtype=torch.float64)
    dx.index_add_(0, order_c // k, dx_cd.double())
    assert x.grad.dtype == dtype
    assert relative_error(x.grad, dx) < BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, width, experts, k", SHAPES)
def test_unpermute_forward_and_backward(tokens, width, experts, k, dtype):
    torch.manual_seed(tokens * width)
    order_c, copy_tk = _routing(tokens, experts, k)
    y = torch.randn(tokens * k, width, device=DEVICE).to(dtype)
    y.requires_grad_()
    weights = torch.rand(tokens, k, device=DEVICE, requires_grad=True)
    out = unpermute(y, weights, copy_tk)
    assert out.dtype == dtype and out.shape == (tokens, width)
    dout = torch.randn_like(out)
    out.backward(dout)

    y64 = y.detach().double().requires_grad_()
    weights64 = weights.detach().double().requires_grad_()
    ref = torch.zeros(tokens, width, device=DEVICE, dtype=torch.float64)
    ref = ref.index_add(0, order_c // k,
                        y64 * weights64.flatten()[order_c, None])
    ref.backward(dout.double())
    assert relative_error(out, ref) < BOUND[dtype]
    assert relative_error(unpermute_reference(y, weights, copy_tk),
                          ref) < BOUND[dtype]
    assert y.grad.dtype == dtype
    assert relative_error(y.grad, y64.grad) < BOUND[dtype]
    assert relative_error(weights.grad, weights64.grad) < BOUND[dtype]


def test_empty_input():
    copy_tk = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    x = torch.randn(0, 16, device=DEVICE)
    assert permute(x, copy_tk).shape == (0, 16)
    assert unpermute(x, torch.empty(0, 2, device=DEVICE),
                     copy_tk).shape == (0, 16)


def test_op_registration():
    """Schema, fake implementation and autograd as torch.compile sees
    them."""
    torch.manual_seed(0)
    _, copy_tk = _routing(9, 8, 2)
    x = torch.randn(9, 24, device=DEVICE, requires_grad=True)
    y = torch.randn(18, 24, device=DEVICE, requires_grad=True)
    weights = torch.rand(9, 2, device=DEVICE, requires_grad=True)
    torch.library.opcheck(permute, (x, copy_tk))
    torch.library.opcheck(unpermute, (y, weights, copy_tk))


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_moe_with_kernels_matches_its_reference(scoring_func):
    """The MoE layer, forward and backward with its auxiliary losses,
    with its kernels (router, permutation, gating; interpreted on CPU)
    against its reference path."""
    from coom.config import ModelConfig
    from coom.layers import moe
    config = ModelConfig(hidden_size=32, n_routed_experts=8,
                         num_experts_per_tok=3, moe_intermediate_size=16,
                         n_group=4, topk_group=2, routed_scaling_factor=2.5,
                         scoring_func=scoring_func, moe_aux_loss_coeff=0.1,
                         moe_seq_aux_loss_coeff=0.1, moe_z_loss_coeff=0.1)

    def build(fused):
        layer = moe.MoE(config, fused)
        layer.init_weights(std=0.3)
        with torch.no_grad():
            layer.router.bias.normal_(std=0.05)
        return layer
    torch.manual_seed(0)
    x = torch.randn(3, 7, 32, device=DEVICE)
    results = []
    for layer in reference_and_fused(build):
        x.grad = None
        x.requires_grad_()
        layer.aux_loss_sum.zero_()
        out = layer(x)
        # The auxiliary losses' gradient joins at the layer's output.
        out.square().mean().backward()
        results.append([out, layer.aux_loss_sum.clone(), x.grad,
                        *(p.grad for p in layer.parameters())])
    for ours, ref in zip(*results):
        assert relative_error(ours, ref) < 1e-5
