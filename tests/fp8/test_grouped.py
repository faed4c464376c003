"""The routed experts' grouped FP8 products: the emulation against one
FP8 linear per expert and float64, the Triton kernel path (through the
interpreter on CPU) against the emulation, the down product with the
gating fused in against the gating followed by the product, and the
products of token copies quantised from their tokens against those of
the copies made."""
import pytest
import torch

from coom.fp8 import ops
from coom.fp8.grouped import (
    fp8_copies_grouped_linear,
    fp8_gated_grouped_linear,
    fp8_grouped_linear,
    grouped_weight_forms,
)
from coom.fp8.linear import FP8Recipe, fp8_linear
from coom.fp8.scaling import TILE, max_group_tiles
from coom.kernels.permute import copy_positions, permute
from coom.kernels.swiglu import swiglu, swiglu_backward
from coom.layers.moe import Copies
from tests.fp8 import outputs_and_gradients, run_product
from tests.kernels import DEVICE, relative_error

COUNTS = [0, 130, 5, 61]
BOUND = 2 ** -11 if DEVICE == "cuda" else 1e-5


def _inputs(k, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(COUNTS), k, generator=generator)
    weight = torch.randn(len(COUNTS), n, k, generator=generator) / k ** 0.5
    dy = torch.randn(sum(COUNTS), n, generator=generator)
    return x, weight, dy


def _grouped(recipe):
    counts = torch.tensor(COUNTS)
    return lambda x, w: fp8_grouped_linear(x, [w], counts.to(x.device),
                                           recipe)[0]


def _per_expert(recipe):
    def product(x, weight):
        return torch.cat([fp8_linear(chunk, weight[e], recipe) for e, chunk
                          in enumerate(x.split(COUNTS))])
    return product


@pytest.mark.parametrize("scaling", ["blockwise", "rowwise"])
def test_emulation_is_one_fp8_linear_per_expert(scaling):
    recipe = FP8Recipe(scaling, emulate=True)
    x, weight, dy = _inputs(200, 136)
    ours = run_product(_grouped(recipe), x, weight, dy)
    for a, b in zip(ours, run_product(_per_expert(recipe), x, weight, dy)):
        assert torch.equal(a, b)
    ref = run_product(lambda a, b: torch.cat([
        chunk @ b[e].T for e, chunk in enumerate(a.split(COUNTS))]),
        x.double(), weight.double(), dy.double())
    assert max(relative_error(a, b) for a, b in zip(ours, ref)) < 2 ** -4
    assert not ours[2][0].any()  # the expert without rows


@pytest.mark.parametrize("k, n", [(208, 144), (256, 128)])
def test_kernels_match_the_emulation(k, n):
    """Same roundings, different summation: float32 agreement in the
    interpreter; Hopper's FP8 tensor cores sum each 128 products with
    about 14 bits (tests/fp8/test_linear.py), so 2^-11 there."""
    x, weight, dy = _inputs(k, n, seed=k)
    emulated = run_product(_grouped(FP8Recipe("blockwise", emulate=True)),
                           x, weight, dy)
    kernels = run_product(_grouped(FP8Recipe("blockwise")), x.to(DEVICE),
                          weight.to(DEVICE), dy.to(DEVICE))
    for ours, ref in zip(kernels, emulated):
        assert ours.dtype == ref.dtype == torch.float32
        assert relative_error(ours.cpu(), ref) < BOUND
    assert not kernels[2][0].any()


def test_kernels_keep_autocast_dtype_and_save_fp8():
    x, weight, _ = _inputs(128, 128)
    x, weight = x.to(DEVICE).requires_grad_(), weight.to(DEVICE)
    counts = torch.tensor(COUNTS, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        (y,) = fp8_grouped_linear(x, [weight], counts,
                                  FP8Recipe("blockwise"))
    assert y.dtype == torch.bfloat16
    saved = y.grad_fn.saved_tensors
    assert saved[0].dtype == torch.float8_e4m3fn
    tiles = max_group_tiles(sum(COUNTS), len(COUNTS))
    assert saved[0].shape == (128, tiles * TILE)  # x^T, tile-padded


def test_products_without_grad_equal_those_with_grad(monkeypatch):
    """Under no_grad (evaluation, generation) the products run without
    the autograd.Function, and without the transposed FP8 copies only a
    backward reads: the same values in the same dtype."""
    x, weight, _ = _inputs(128, 128)
    x, weight = x.to(DEVICE), weight.to(DEVICE)
    counts = torch.tensor(COUNTS, device=DEVICE)
    recipe = FP8Recipe("blockwise")
    transposing = []

    def spy(name):
        op = getattr(ops, name)

        def recording(*args, **kwargs):
            transposing.append(name)
            return op(*args, **kwargs)
        monkeypatch.setattr(ops, name, recording)

    spy("quantize_rows_and_transpose")
    spy("quantize_blocks_and_transpose")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        (with_grad,) = fp8_grouped_linear(x.clone().requires_grad_(),
                                          [weight], counts, recipe)
        assert transposing == ["quantize_rows_and_transpose",
                               "quantize_blocks_and_transpose"]
        with torch.no_grad():
            (without,) = fp8_grouped_linear(x, [weight], counts, recipe)
        assert len(transposing) == 2
    assert with_grad.grad_fn is not None and without.grad_fn is None
    assert without.dtype == torch.bfloat16
    assert torch.equal(without, with_grad.detach())


def test_weights_sharing_one_quantisation_of_x():
    """Two weights on one x (the experts' gate and up products): the same
    outputs and gradients as two separate products, from one FP8 copy of
    x^T saved for the backward."""
    x, weight, dy = _inputs(256, 128, seed=1)
    x, weight, dy = x.to(DEVICE), weight.to(DEVICE), dy.to(DEVICE)
    other, dy_other = weight.flip(0), dy.flip(1)
    counts = torch.tensor(COUNTS, device=DEVICE)
    recipe = FP8Recipe("blockwise")
    leaves = [t.clone().requires_grad_() for t in (x, weight, other)]
    pair = fp8_grouped_linear(leaves[0], leaves[1:], counts, recipe)
    saved = [t for t in pair[0].grad_fn.saved_tensors if t is not None]
    assert sum(t.dtype == torch.float8_e4m3fn for t in saved) == 3
    torch.autograd.backward(pair, [dy, dy_other])
    single = run_product(_grouped(recipe), x, weight, dy)
    single_other = run_product(_grouped(recipe), x, other, dy_other)
    assert torch.equal(pair[0], single[0])
    assert torch.equal(pair[1], single_other[0])
    assert torch.equal(leaves[0].grad, single[1] + single_other[1])
    assert torch.equal(leaves[1].grad, single[2])
    assert torch.equal(leaves[2].grad, single_other[2])


@pytest.mark.parametrize("kept", [False, True], ids=["made", "kept"])
def test_gating_fused_into_the_down_product(kept):
    """The down product of the gated units with the gating fused into its
    quantisation gives what the gating kernel followed by the grouped
    product gives: output, gate and up gradients and weight gradient, bit
    for bit, in bf16, with the weight's forms made or kept (the fused
    quantisation in float32 too: tests/fp8/test_quantize.py)."""
    dtype = torch.bfloat16
    recipe = FP8Recipe("blockwise")
    generator = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(sum(COUNTS), 192, generator=generator)
                .to(DEVICE, dtype) for _ in range(2))
    weight = (torch.randn(len(COUNTS), 256, 192, generator=generator)
              / 14).to(DEVICE, dtype)
    dy = torch.randn(sum(COUNTS), 256, generator=generator).to(DEVICE, dtype)
    counts = torch.tensor(COUNTS, device=DEVICE)
    forms = grouped_weight_forms(weight, recipe) if kept else ()
    tensors = (gate, up, weight)
    with swiglu.set_kernel_enabled("cpu", False), \
            swiglu_backward.set_kernel_enabled("cpu", False):
        fused = outputs_and_gradients(
            lambda g, u, w: fp8_gated_grouped_linear(g, u, w, counts,
                                                     recipe, forms),
            tensors, dy)
        unfused = outputs_and_gradients(
            lambda g, u, w: fp8_grouped_linear(
                swiglu(g, u), [w], counts, recipe,
                [forms] if kept else ())[0], tensors, dy)
    for ours, expected in zip(fused, unfused):
        assert ours.dtype == expected.dtype
        assert torch.equal(ours, expected)


def test_copies_quantised_from_their_tokens():
    """The gate and up products of token copies quantised straight from
    the tokens give what the products of the permuted copies give:
    outputs and the gradients of the tokens and weights, bit for bit."""
    recipe = FP8Recipe("blockwise")
    generator = torch.Generator().manual_seed(8)
    tokens, k, experts = 60, 3, len(COUNTS)
    x_td = torch.randn(tokens, 192, generator=generator).to(DEVICE)
    order_c = torch.randperm(tokens * k, generator=generator).to(DEVICE)
    copy_tk = copy_positions(order_c, k)
    counts = torch.tensor([0, 100, 20, 60], device=DEVICE)
    w1, w3 = ((torch.randn(experts, 128, 192, generator=generator) / 14)
              .to(DEVICE) for _ in range(2))
    dys = [torch.randn(tokens * k, 128, generator=generator).to(DEVICE)
           for _ in range(2)]

    def run(products):
        leaves = [t.clone().requires_grad_() for t in (x_td, w1, w3)]
        outputs = products(*leaves)
        torch.autograd.backward(outputs, dys)
        return [*outputs, *(leaf.grad for leaf in leaves)]

    fused = run(lambda x, a, b: fp8_copies_grouped_linear(
        Copies(x, copy_tk, True), [a, b], counts, recipe))
    unfused = run(lambda x, a, b: fp8_grouped_linear(
        permute(x, copy_tk), [a, b], counts, recipe))
    for ours, expected in zip(fused, unfused):
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_weight_gradients_are_made_in_the_weights_dtype(monkeypatch,
                                                        gated):
    """A bf16 weight's gradient is stored in bf16 by the kernel that sums
    it (in float32), not written in float32 for autograd to cast: the
    same bits as the float32 sum rounded, for the gate-and-up products
    and for the down product with its gating fused in."""
    recipe = FP8Recipe("blockwise")
    generator = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16
    x, gate, up = (torch.randn(sum(COUNTS), 192, generator=generator)
                   .to(DEVICE, dtype) for _ in range(3))
    weight = (torch.randn(len(COUNTS), 256, 192, generator=generator)
              / 14).to(DEVICE, dtype).requires_grad_()
    counts = torch.tensor(COUNTS, device=DEVICE)
    stored = []
    wgrad = ops.grouped_mm_wgrad

    def checked(*operands):
        *inputs, out_dtype = operands
        out = wgrad(*inputs, out_dtype)
        assert torch.equal(out, wgrad(*inputs, torch.float32).to(out_dtype))
        stored.append(out_dtype)
        return out

    monkeypatch.setattr(ops, "grouped_mm_wgrad", checked)
    if gated:
        y = fp8_gated_grouped_linear(gate, up, weight, counts, recipe)
    else:
        (y,) = fp8_grouped_linear(x, [weight], counts, recipe)
    y.float().square().sum().backward()
    assert stored == [dtype] and weight.grad.dtype == dtype
    assert weight.grad.abs().sum() > 0
