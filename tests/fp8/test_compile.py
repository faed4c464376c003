"""The FP8 products under ``torch.compile``, on a GPU only (kernels run
by Triton's interpreter cannot be traced): inductor traces the
quantisation ops (``triton_op``) and launches their kernels from its own
code, keeps the grouped products whole, and gives eager's results bit
for bit."""
import pytest
import torch
from torch._inductor.utils import run_and_get_code

from coom.fp8.grouped import fp8_grouped_linear
from coom.fp8.linear import FP8Linear, FP8Recipe, fp8_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="inductor's GPU code: run by "
                                       ".ci/gpu-tests")

COUNTS = [0, 130, 5, 61]
RECIPE = FP8Recipe("blockwise")


def _products(x_cd, weight_dd, w1_eid, w3_eid, w2_edi, counts_e):
    """A dense FP8 linear, then the experts' three grouped products, with
    nothing but the products in between (no rounding that inductor could
    fuse away)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h_cd = fp8_linear(x_cd, weight_dd, RECIPE)
        gate_ci, up_ci = fp8_grouped_linear(h_cd, [w1_eid, w3_eid],
                                            counts_e, RECIPE)
        (out_cd,) = fp8_grouped_linear(gate_ci, [w2_edi], counts_e, RECIPE)
    return out_cd, up_ci


def _run(products, tensors, counts_e, dys):
    """Outputs, then the gradients of every input, for those output
    gradients."""
    leaves = [tensor.clone().requires_grad_() for tensor in tensors]
    outputs = products(*leaves, counts_e)
    torch.autograd.backward(outputs, dys)
    return [*outputs, *(leaf.grad for leaf in leaves)]


def _inputs(weight_dtype=torch.float32):
    """x, a dense weight, the experts' w1, w3, w2 (in weight_dtype),
    output gradients and counts."""
    generator = torch.Generator().manual_seed(0)
    rows, d, i = sum(COUNTS), 256, 128

    def normal(*shape, fan_in=1):
        return (torch.randn(*shape, generator=generator)
                / fan_in ** 0.5).cuda()
    weights = [normal(d, d, fan_in=d), normal(len(COUNTS), i, d, fan_in=d),
               normal(len(COUNTS), i, d, fan_in=d),
               normal(len(COUNTS), d, i, fan_in=i)]
    tensors = [normal(rows, d),
               *(weight.to(weight_dtype) for weight in weights)]
    dys = [normal(rows, d).bfloat16(), normal(rows, i).bfloat16()]
    return tensors, dys, torch.tensor(COUNTS).cuda()


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_compiled_products_match_eager_and_launch_kernels_inline(
        weight_dtype):
    """Also with bf16 weights (compute copies), whose gradients the
    grouped kernel stores in bf16."""
    tensors, dys, counts_e = _inputs(weight_dtype)
    eager = _run(_products, tensors, counts_e, dys)
    torch._dynamo.reset()
    compiled, sources = run_and_get_code(
        _run, torch.compile(_products, fullgraph=True), tensors, counts_e,
        dys)
    for ours, ref in zip(compiled, eager):
        assert torch.equal(ours, ref)
    code = "\n".join(sources)
    for kernel in ("_row_tiles_kernel", "_blocks_kernel"):
        assert kernel in code
    for op in ("fp8_quantize_rows_and_transpose",
               "fp8_quantize_blocks_and_transpose"):
        assert f"coom.{op}" not in code
    for op in ("fp8_grouped_mm", "fp8_grouped_mm_wgrad"):
        assert f"coom.{op}.default" in code  # kept whole


class _Products(torch.nn.Module):
    """``_products`` as a model holds them: weights are parameters, and
    the recipe an attribute of the layers."""

    def __init__(self, weight_dd, w1_eid, w3_eid, w2_edi):
        super().__init__()
        out_features, in_features = weight_dd.shape
        self.linear = FP8Linear(in_features, out_features, RECIPE,
                                device="cuda")
        self.linear.weight.data.copy_(weight_dd)
        self.experts = torch.nn.ParameterList([w1_eid, w3_eid, w2_edi])
        self.recipe = RECIPE

    def forward(self, x_cd, counts_e):
        w1_eid, w3_eid, w2_edi = self.experts
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h_cd = self.linear(x_cd)
            gate_ci, up_ci = fp8_grouped_linear(h_cd, [w1_eid, w3_eid],
                                                counts_e, self.recipe)
            (out_cd,) = fp8_grouped_linear(gate_ci, [w2_edi], counts_e,
                                           self.recipe)
        return out_cd, up_ci


def test_compiled_products_trace_whole_without_grad():
    """Evaluation runs the products under no_grad before training runs
    them with gradients, on the same compiled model: both traced whole
    (a failure under no_grad once made torch.compile run every block
    eagerly for the rest of the run, training included), with eager's
    values; under no_grad inductor launches the quantisations without
    transposed copies from its own code too."""
    (x_cd, *weights), dys, counts_e = _inputs()
    model = _Products(*weights)
    with torch.no_grad():
        eager = model(x_cd, counts_e)
    eager_grad = model(x_cd, counts_e)
    torch._dynamo.reset()
    compiled_model = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        compiled, sources = run_and_get_code(compiled_model, x_cd,
                                             counts_e)
    code = "\n".join(sources)
    for kernel in ("_row_tiles_kernel", "_blocks_kernel"):
        assert kernel in code
    for op in ("fp8_quantize_rows", "fp8_quantize_blocks"):
        assert f"coom.{op}" not in code  # traced, not called
    compiled_grad = compiled_model(x_cd, counts_e)
    torch.autograd.backward(compiled_grad, dys)
    for ours, ref, with_grad in zip(compiled, eager, eager_grad):
        assert torch.equal(ours, ref)
        assert torch.equal(ours, with_grad.detach())
