"""Each op's CPU kernel: the reference, forward and backward, without
launching Triton."""
import pytest
import torch

from coom.kernels import cross_entropy, permute, rmsnorm, rope, router, swiglu
from tests.kernels import relative_error

pytestmark = pytest.mark.cpu_kernels


def _floating(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _run(function, inputs):
    """function's outputs, then the gradients of its floating inputs
    under seeded random gradients of its floating outputs."""
    leaves = [t.detach().requires_grad_() if _floating(t) else t
              for t in inputs]
    outputs = function(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    floating = [out for out in outputs if _floating(out)]
    torch.manual_seed(0)
    torch.autograd.backward(floating,
                            [torch.randn_like(out) for out in floating])
    return [*outputs, *(t.grad for t in leaves if _floating(t))]


def _same(op, reference, inputs):
    for ours, theirs in zip(_run(op, inputs), _run(reference, inputs),
                            strict=True):
        if _floating(ours):
            assert relative_error(ours, theirs) < 1e-6
        else:
            assert torch.equal(ours, theirs)


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    """Any Triton launch fails."""
    class Refused:
        def __getitem__(self, grid):
            raise AssertionError("a Triton kernel was launched")
    for module, names in ((rmsnorm, ["_forward_kernel", "_backward_kernel"]),
                          (swiglu, ["_forward_kernel", "_backward_kernel"]),
                          (rope, ["_rotate_kernel"]),
                          (router, ["_route_kernel",
                                    "_route_backward_kernel"]),
                          (permute, ["_scatter_kernel", "_gather_kernel"]),
                          (cross_entropy, ["_cross_entropy_kernel"])):
        for name in names:
            monkeypatch.setattr(module, name, Refused())


def test_rms_norm():
    x, weight = torch.randn(5, 123) * 3, torch.randn(123)
    _same(rmsnorm.rms_norm, rmsnorm.rms_norm_reference, (x, weight, 1e-6))


def test_add_rms_norm():
    x, residual = torch.randn(2, 3, 7, 40)
    weight = torch.randn(40)

    def reference(x, residual, weight, eps):
        h = residual + x
        return h, rmsnorm.rms_norm_reference(h, weight, eps)
    _same(rmsnorm.add_rms_norm, reference, (x, residual, weight, 1e-5))


def test_swiglu():
    _same(swiglu.swiglu, swiglu.swiglu_reference,
          (torch.randn(3, 41) * 4, torch.randn(3, 41)))


def test_rotate():
    x = torch.randn(2, 5, 3, 8)
    cos, sin = torch.randn(2, 9, 4)
    # The tables get no gradient.
    _same(lambda x: rope.rotate(x, cos, sin, 3),
          lambda x: rope.rotate_reference(x, cos, sin, 3), (x,))


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_route(scoring_func, norm_topk_prob):
    bias = torch.randn(16) / 16
    fields = (3, scoring_func, 4, 2, "noaux_tc", norm_topk_prob, 2.5)
    _same(lambda logits: router.route(logits, bias, *fields),
          lambda logits: router.route_reference(logits, bias, *fields),
          (torch.randn(37, 16) * 2,))


def test_permute_and_unpermute():
    experts_tk = torch.randint(0, 8, (9, 3))
    order_c = experts_tk.flatten().argsort(stable=True)
    copy_tk = permute.copy_positions(order_c, 3)
    _same(permute.permute, permute.permute_reference,
          (torch.randn(9, 24), copy_tk))
    for weights_tk in (torch.rand(9, 3), None):
        _same(permute.unpermute, permute.unpermute_reference,
              (torch.randn(27, 24), weights_tk, copy_tk))


def test_linear_cross_entropy(monkeypatch):
    monkeypatch.setattr(cross_entropy, "chunk_rows", lambda *_: 16)
    labels, scale = torch.randint(0, 50, (45,)), torch.rand(45)
    _same(lambda x, weight: cross_entropy.linear_cross_entropy(
              x, weight, labels, scale),
          lambda x, weight: cross_entropy.linear_cross_entropy_reference(
              x, weight, labels, scale),
          (torch.randn(45, 24), torch.randn(50, 24)))
