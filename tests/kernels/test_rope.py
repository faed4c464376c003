"""Triton rotary embedding against a float64 reference (interpreted on
CPU)."""
import pytest
import torch

from coom.kernels.rope import rotate
from tests.kernels import BOUND, DEVICE, relative_error


def _tables(positions: int, width: int):
    angles = torch.rand(positions, width // 2, device=DEVICE) * 100
    return angles.cos(), angles.sin()


def _reference(x, cos_sk, sin_sk, start):
    """x times e^(j angle), in complex float64."""
    end = start + x.shape[1]
    turn = torch.complex(cos_sk.double(), sin_sk.double())[start:end, None]
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * turn).flatten(-2)


def _check(leaf, cos_sk, sin_sk, start, bound, view=lambda t: t):
    """Rotates view(leaf), then the gradient dy back to leaf."""
    x = view(leaf)
    dy = torch.randn(x.shape, device=DEVICE).to(x.dtype)
    y = rotate(x, cos_sk, sin_sk, start)
    assert y.dtype == x.dtype and y.shape == x.shape
    y.backward(dy)

    leaf64 = leaf.detach().double().requires_grad_()
    ref = _reference(view(leaf64), cos_sk, sin_sk, start)
    ref.backward(dy.double())
    assert relative_error(y, ref) < bound
    assert relative_error(leaf.grad, leaf64.grad) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, seq, heads, width, start",
                         [(1, 5, 1, 64, 0), (3, 41, 3, 8, 7),
                          (2, 500, 1, 64, 100), (2, 9, 12, 64, 3)])
def test_rotate_forward_and_backward(batch, seq, heads, width, start,
                                     dtype):
    torch.manual_seed(batch * seq * heads * width)
    cos_sk, sin_sk = _tables(start + seq + 5, width)
    x = torch.randn(batch, seq, heads, width, device=DEVICE).to(dtype)
    _check(x.requires_grad_(), cos_sk, sin_sk, start, BOUND[dtype])


def test_rotate_reads_slices_of_wider_tensors():
    """MLA's query and key rope parts: channels of a projection's output.
    """
    torch.manual_seed(1)
    cos_sk, sin_sk = _tables(20, 8)
    query = torch.randn(2, 7, 3, 24, device=DEVICE, requires_grad=True)
    _check(query, cos_sk, sin_sk, 4, 1e-5, lambda t: t[..., 16:])
    key = torch.randn(2, 7, 40, device=DEVICE, requires_grad=True)
    _check(key, cos_sk, sin_sk, 4, 1e-5,
           lambda t: t[..., 32:].unsqueeze(2))


def test_rotate_of_empty_input_and_of_positions_past_the_tables():
    cos_sk, sin_sk = _tables(10, 8)
    x = torch.randn(2, 0, 3, 8, device=DEVICE, requires_grad=True)
    y = rotate(x, cos_sk, sin_sk, 4)
    assert y.shape == (2, 0, 3, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    with pytest.raises(ValueError, match="positions up to 11"):
        rotate(torch.randn(1, 7, 1, 8, device=DEVICE), cos_sk, sin_sk, 4)


def test_rotate_passes_opcheck_and_compiles():
    """Fake implementation and autograd as torch.compile needs them."""
    cos_sk, sin_sk = _tables(10, 8)
    x = torch.randn(2, 5, 3, 8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(rotate, (x, cos_sk, sin_sk, 2))
    compiled = torch.compile(rotate, fullgraph=True, backend="aot_eager")
    compiled(x, cos_sk, sin_sk, 2).square().sum().backward()
    expected = x.grad.clone()
    x.grad = None
    rotate(x, cos_sk, sin_sk, 2).square().sum().backward()
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("interleave", [True, False])
def test_rotary_embedding_with_the_kernel_matches_the_reference(
        interleave):
    from coom.config import ModelConfig
    from coom.layers import rope
    config = ModelConfig(qk_rope_head_dim=16, max_position_embeddings=64,
                         rope_type="yarn", rotary_scaling_factor=4.0,
                         original_max_position_embeddings=16,
                         rope_interleave=interleave)
    torch.manual_seed(2)
    q = torch.randn(2, 9, 3, 40, device=DEVICE, requires_grad=True)
    results = []
    for fused in (False, True):
        embedding = rope.RotaryEmbedding(config, fused).to(DEVICE)
        embedding.init_weights()
        q.grad = None
        y = embedding(q[..., 24:], start=11)
        y.square().sum().backward()
        results.append((y, q.grad))
    for ours, ref in zip(*results):
        assert relative_error(ours, ref) < 1e-5
