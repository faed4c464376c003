"""The emulated FP8 linear against a float64 reference, and against bf16.

Observed relative errors (||out - ref|| / ||ref||, these shapes and
seeds, printed with -s): 3.6-3.9% for y, dx and dW with every recipe
(2.5% for dW at 5 tokens), bf16 0.29%. One E4M3 rounding (3 mantissa
bits) has a relative rms error of at most 2^-4 / sqrt(3) = 3.6%; two
rounded operands about sqrt(2) times that, three sqrt(3) times: so the
bound is 2^-4, and 2^-8 (bf16's 7 bits, three roundings with the
output's) for bf16.
"""
import pytest
import torch

from coom.fp8 import linear, ops
from coom.fp8.linear import (
    FP8Linear,
    FP8Recipe,
    fp8_gated_linear,
    fp8_linear,
    fp8_linears,
)
from coom.fp8.scaling import E4M3, RECIPES, TILE
from coom.kernels.swiglu import swiglu, swiglu_backward
from tests.fp8 import outputs_and_gradients, run_product
from tests.kernels import relative_error

FP8_BOUND, BF16_BOUND = 2 ** -4, 2 ** -8


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("tokens, k, n", [(5, 123, 77), (300, 256, 384),
                                          (130, 1000, 129)])
def test_products_close_to_float64(recipe, tokens, k, n):
    generator = torch.Generator().manual_seed(tokens + k + n)
    x = torch.randn(tokens, k, generator=generator)
    weight = torch.randn(n, k, generator=generator) / k ** 0.5
    dy = torch.randn(tokens, n, generator=generator)
    emulated = FP8Recipe(recipe, emulate=True)
    ours = run_product(lambda a, b: fp8_linear(a, b, emulated), x, weight, dy)
    ref = run_product(lambda a, b: a @ b.T, x.double(), weight.double(),
                      dy.double())
    bf16 = run_product(lambda a, b: (a.bfloat16() @ b.bfloat16().T).float(),
                       x, weight, dy)
    errors = [relative_error(a, b) for a, b in zip(ours, ref)]
    bf16_errors = [relative_error(a, b) for a, b in zip(bf16, ref)]
    print(f"{recipe} {tokens}x{k}x{n}: fp8 y/dx/dW "
          f"{', '.join(f'{e:.4f}' for e in errors)}; bf16 "
          f"{', '.join(f'{e:.4f}' for e in bf16_errors)}")
    assert max(errors) < FP8_BOUND
    assert max(bf16_errors) < BF16_BOUND
    assert ours[1].dtype == ours[2].dtype == torch.float32


def test_saves_its_input_in_fp8():
    x = torch.randn(64, 256, requires_grad=True)
    weight = torch.randn(128, 256, requires_grad=True)
    y = fp8_linear(x, weight, FP8Recipe("blockwise", emulate=True))
    saved = y.grad_fn.next_functions[0][0].saved_tensors
    # x^T, the weight gradient's operand, in 1 x 128 tiles along tokens.
    assert saved[0].dtype == E4M3 and saved[0].shape == (256, 64)
    assert saved[1].shape == (256, 1)


def test_module_keeps_shapes_and_autocast_dtype():
    layer = FP8Linear(256, 96, FP8Recipe("rowwise", emulate=True))
    torch.nn.init.normal_(layer.weight, std=0.05)
    x = torch.randn(2, 7, 256)
    assert layer(x).shape == (2, 7, 96) and layer(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert "scaling='rowwise'" in repr(layer)
    with pytest.raises(ValueError, match="unknown FP8 recipe"):
        FP8Recipe("e5m2")


def _record_quantised_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """Spy on the products' quantisations: the shape of each operand they
    quantise, a transposed copy as (k, m) beside its (m, k)."""
    shapes = []

    def spy(function, transposes):
        def recording(tensor, *args, **kwargs):
            shapes.append(tuple(tensor.shape))
            if transposes:
                shapes.append(tuple(tensor.shape[::-1]))
            return function(tensor, *args, **kwargs)
        return recording

    monkeypatch.setattr(linear, "quantize", spy(linear.quantize, False))
    for name, transposes in (("quantize_rows", False),
                             ("quantize_blocks", False),
                             ("quantize_rows_and_transpose", True),
                             ("quantize_blocks_and_transpose", True)):
        monkeypatch.setattr(ops, name, spy(getattr(ops, name), transposes))
    return shapes


@pytest.mark.parametrize("recipe", [
    pytest.param(recipe, marks=pytest.mark.skipif(
        recipe == "blockwise" and not torch.cuda.is_available(),
        reason="blockwise torch._scaled_mm needs a GPU"))
    for recipe in RECIPES])
def test_products_without_grad_equal_those_with_grad(recipe, monkeypatch):
    """Under no_grad (evaluation, generation) the products on FP8 units
    run without the autograd.Function, and without the FP8 x^T and W^T
    only a backward reads: the same values, dtype and shape."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(3)
    layer = FP8Linear(256, 384, FP8Recipe(recipe), device=device)
    x = torch.randn(2, 64, 256, generator=generator).to(device)
    quantised = _record_quantised_shapes(monkeypatch)
    with torch.autocast(device, dtype=torch.bfloat16):
        with_grad = layer(x)
        x_mk, w_nk, x_km, w_kn = (128, 256), (384, 256), (256, 128), \
            (256, 384)
        assert quantised == [x_mk, x_km, w_nk, w_kn]
        quantised.clear()
        with torch.no_grad():
            without = layer(x)
        assert quantised == [x_mk, w_nk]
    assert with_grad.grad_fn is not None and without.grad_fn is None
    assert without.dtype == torch.bfloat16 and without.shape == (2, 64, 384)
    assert torch.equal(without, with_grad.detach())


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FP8 matrix units: run by .ci/gpu-tests")
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("tokens, k, n", [(256, 1536, 512),
                                          (512, 512, 3072),
                                          (384, 1152, 2304)])
def test_fp8_units_match_the_emulation(recipe, tokens, k, n):
    """torch._scaled_mm on the same FP8 operands as the emulation; an
    input gradient summing over 18 tiles (n = 2304) needs its block
    scales padded to whole rows of 4. Hopper's
    FP8 tensor cores sum with about 14 bits of precision (DeepSeek-V3,
    section 3.3.2), so the two differ by about 2^-13 relative: measured
    1.2-1.3e-4 on an H100."""
    generator = torch.Generator().manual_seed(tokens + n)
    x = torch.randn(tokens, k, generator=generator).cuda()
    weight = (torch.randn(n, k, generator=generator) / k ** 0.5).cuda()
    dy = torch.randn(tokens, n, generator=generator).cuda()
    emulated = run_product(lambda a, b: fp8_linear(
        a, b, FP8Recipe(recipe, emulate=True)), x, weight, dy)
    units = run_product(lambda a, b: fp8_linear(a, b, FP8Recipe(recipe)),
                        x, weight, dy)
    errors = [relative_error(a, b) for a, b in zip(units, emulated)]
    print(f"{recipe} {tokens}x{k}x{n}: units vs emulation y/dx/dW "
          f"{', '.join(f'{e:.2e}' for e in errors)}")
    assert max(errors) < 2 ** -11


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FP8 matrix units: run by .ci/gpu-tests")
def test_weights_sharing_one_quantisation_of_x():
    """Two weights on one x (a feed-forward's gate and up products): the
    same outputs and gradients as two separate products, from one FP8
    copy of x^T saved for the backward."""
    generator = torch.Generator().manual_seed(2)
    x, gate, up, dy_gate, dy_up = (
        torch.randn(*shape, generator=generator).cuda()
        for shape in [(256, 512), (384, 512), (384, 512), (256, 384),
                      (256, 384)])
    recipe = FP8Recipe("blockwise")
    leaves = [t.clone().requires_grad_() for t in (x, gate, up)]
    pair = fp8_linears(leaves[0], leaves[1:], recipe)
    saved = pair[0].grad_fn.next_functions[0][0].saved_tensors
    assert sum(t.dtype == E4M3 for t in saved) == 3
    torch.autograd.backward(pair, [dy_gate, dy_up])
    singles = [run_product(lambda a, b: fp8_linear(a, b, recipe), x,
                           weight, dy)
               for weight, dy in [(gate, dy_gate), (up, dy_up)]]
    for y, leaf, single in zip(pair, leaves[1:], singles):
        assert torch.equal(y, single[0])
        assert torch.equal(leaf.grad, single[2])
    assert torch.equal(leaves[0].grad, singles[0][1] + singles[1][1])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FP8 matrix units: run by .ci/gpu-tests")
@pytest.mark.parametrize("kept", [False, True], ids=["made", "kept"])
def test_gating_fused_into_the_down_product(kept):
    """A feed-forward's down product with the gating fused into its
    quantisation: what the gating kernel followed by the FP8 linear
    gives, output and gate, up and weight gradients bit for bit, with
    the weight's forms made or kept."""
    generator = torch.Generator().manual_seed(4)
    gate, up, dy = (torch.randn(*shape, generator=generator).cuda()
                    .bfloat16() for shape in [(2, 128, 384), (2, 128, 384),
                                              (2, 128, 256)])
    weight = (torch.randn(256, 384, generator=generator) / 20).cuda()
    recipe = FP8Recipe("blockwise")
    forms = linear.weight_forms(weight.bfloat16(), "blockwise", False) \
        if kept else ()

    def autocast(down):
        def product(*tensors):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return down(*tensors)
        return product

    def fused_down(g, u, w):
        return fp8_gated_linear(g, u, w, recipe, forms)

    def unfused_down(g, u, w):
        return fp8_linears(swiglu(g, u), [w], recipe,
                           [forms] if kept else ())[0]

    tensors = (gate, up, weight)
    fused = outputs_and_gradients(autocast(fused_down), tensors, dy)
    unfused = outputs_and_gradients(autocast(unfused_down), tensors, dy)
    for ours, expected in zip(fused, unfused):
        assert ours.dtype == expected.dtype
        assert torch.equal(ours, expected)


def _scaled_mm_in_float32(a_values_mk, b_values_kn, scale_a, scale_b,
                          out_dtype):
    """cuBLAS's blockwise product as the CPU can run it: both operands
    dequantised in float32 (1 x 128 tiles for a; 128 x 128 blocks, or
    1 x 128 tiles along k, for b), then multiplied."""
    m, k = a_values_mk.shape
    n = b_values_kn.shape[1]
    a = a_values_mk.float() * scale_a.repeat_interleave(TILE, 1)[:, :k]
    b_scales = scale_b.repeat_interleave(TILE, 0)[:k]
    if b_scales.shape[1] != n:
        b_scales = b_scales.repeat_interleave(TILE, 1)[:, :n]
    return (a @ (b_values_kn.float() * b_scales)).to(out_dtype)


@pytest.mark.parametrize("kept", [False, True], ids=["made", "kept"])
def test_fused_gating_runs_the_unfused_products(monkeypatch, kept):
    """On the CPU, with cuBLAS's product replaced by its float32
    equivalent and the quantisation kernels interpreted: the fused down
    product's output and gradients equal the gating kernel followed by
    the FP8 linear's, bit for bit (``test_gating_fused_into_the_down_
    product`` checks the same on a GPU with cuBLAS itself)."""
    if torch.cuda.is_available():
        pytest.skip("the GPU runs cuBLAS itself (the test above)")
    monkeypatch.setattr(ops, "scaled_mm", _scaled_mm_in_float32)
    generator = torch.Generator().manual_seed(6)
    gate, up, dy = (torch.randn(*shape, generator=generator)
                    for shape in [(2, 70, 384), (2, 70, 384),
                                  (2, 70, 256)])
    weight = torch.randn(256, 384, generator=generator) / 20
    recipe = FP8Recipe("blockwise")
    forms = linear.weight_forms(weight, "blockwise", False) if kept else ()
    tensors = (gate, up, weight)
    with swiglu.set_kernel_enabled("cpu", False), \
            swiglu_backward.set_kernel_enabled("cpu", False):
        fused = outputs_and_gradients(
            lambda g, u, w: fp8_gated_linear(g, u, w, recipe, forms),
            tensors, dy)
        unfused = outputs_and_gradients(
            lambda g, u, w: fp8_linears(swiglu(g, u), [w], recipe,
                                        [forms] if kept else ())[0],
            tensors, dy)
    assert "_FP8GatedLinear" in fused[0].grad_fn.next_functions[0][0].name()
    for ours, expected in zip(fused, unfused):
        assert ours.dtype == expected.dtype
        assert torch.equal(ours, expected)
