"""The AdamW step that writes the compute copy (interpreted on CPU):
against torch.optim.AdamW in float64 over several steps, and its copy
the new parameter rounded to bf16; with a gradient scale (clipping's
coefficient), the step of the scaled gradient."""
import json
import os
import subprocess
import sys

import pytest
import torch

from coom.kernels.adamw import adamw_step, adamw_step_reference
from tests.kernels import DEVICE, relative_error

SETTINGS = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS = 4


def _scale(value: float) -> torch.Tensor:
    """A gradient scale as the kernel reads it, on the device."""
    return torch.tensor(value, device=DEVICE)


def _step(step, parameter, grad, state, copy, reference: bool,
          grad_scale: float):
    beta1, beta2 = SETTINGS["betas"]
    operands = (parameter, grad, state["exp_avg"], state["exp_avg_sq"],
                copy)
    settings = (SETTINGS["lr"], beta1, beta2, SETTINGS["eps"],
                SETTINGS["weight_decay"], step)
    if reference:
        adamw_step_reference(*operands, *settings, grad_scale)
    else:
        adamw_step(*([operand] for operand in operands), *settings,
                   _scale(grad_scale))


@pytest.mark.parametrize("grad_scale", [1.0, 0.3])
@pytest.mark.parametrize("reference", [False, True],
                         ids=["triton", "reference"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (33, 129), (4097,)])
def test_step_matches_torch_adamw(shape, grad_dtype, reference,
                                  grad_scale):
    torch.manual_seed(sum(shape))
    start = torch.randn(shape, dtype=torch.float64)
    exact = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([exact], foreach=False, **SETTINGS)
    parameter = start.float().to(DEVICE)
    state = {"exp_avg": torch.zeros_like(parameter),
             "exp_avg_sq": torch.zeros_like(parameter)}
    copy = torch.full(shape, float("nan"), dtype=torch.bfloat16,
                      device=DEVICE)
    for step in range(1, STEPS + 1):
        grad = torch.randn(shape).to(grad_dtype)
        exact.grad = grad.double() * grad_scale
        optimizer.step()
        _step(step, parameter, grad.to(DEVICE), state, copy, reference,
              grad_scale)
        assert relative_error(parameter, exact.detach()) < 1e-6
        assert relative_error(state["exp_avg"],
                              optimizer.state[exact]["exp_avg"]) < 1e-6
        assert relative_error(state["exp_avg_sq"],
                              optimizer.state[exact]["exp_avg_sq"]) < 1e-6
        assert torch.equal(copy, parameter.to(torch.bfloat16))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_one_launch_steps_each_tensor_as_alone(grad_dtype):
    """Tensors of several sizes (one empty, some across blocks) in one
    launch: each steps exactly as it does in a launch of its own, and
    as the reference does."""
    torch.manual_seed(0)
    shapes = [(4097,), (0,), (33, 129), (7,), (2, 4096)]
    beta1, beta2 = SETTINGS["betas"]
    settings = (SETTINGS["lr"], beta1, beta2, SETTINGS["eps"],
                SETTINGS["weight_decay"], 3)

    def operands():
        generator = torch.Generator().manual_seed(1)
        made = []
        for shape in shapes:
            tensors = [torch.randn(shape, generator=generator)
                       for _ in range(4)]
            tensors[1] = tensors[1].to(grad_dtype)
            tensors[3] = tensors[3].abs()
            made.append([t.to(DEVICE) for t in tensors]
                        + [torch.empty(shape, dtype=torch.bfloat16,
                                       device=DEVICE)])
        return made

    together, alone, reference = operands(), operands(), operands()
    adamw_step(*(list(column) for column in zip(*together)), *settings,
               _scale(0.5))
    for tensors in alone:
        adamw_step(*([tensor] for tensor in tensors), *settings,
                   _scale(0.5))
    for tensors in reference:
        adamw_step_reference(*tensors, *settings, 0.5)
    for mine, own, plain in zip(together, alone, reference):
        for index in (0, 2, 3, 4):
            assert torch.equal(mine[index], own[index])
        if mine[0].numel():
            assert relative_error(mine[0], plain[0]) < 1e-6
            assert torch.equal(mine[4], mine[0].to(torch.bfloat16))


def test_bf16_moments_step_in_float32_and_store_rounded():
    """DeepSeek-V3's bf16 moments: the reference steps them as float32
    moments of the same values and stores them rounded, the parameter
    following the unrounded ones; the kernel's step is the
    reference's."""
    torch.manual_seed(3)
    shape = (33, 129)
    beta1, beta2 = SETTINGS["betas"]
    settings = (SETTINGS["lr"], beta1, beta2, SETTINGS["eps"],
                SETTINGS["weight_decay"], 2)
    param, grad = torch.randn(shape), torch.randn(shape)
    moments = [torch.randn(shape).bfloat16(),
               torch.randn(shape).abs().bfloat16()]

    def run(step, device, dtype):
        operands = [param.clone().to(device), grad.to(device),
                    *(m.to(device, dtype, copy=True) for m in moments),
                    torch.empty(shape, dtype=torch.bfloat16,
                                device=device)]
        step(*operands)
        return operands

    wide = run(lambda *o: adamw_step_reference(*o, *settings), "cpu",
               torch.float32)
    narrow = run(lambda *o: adamw_step_reference(*o, *settings), "cpu",
                 torch.bfloat16)
    assert torch.equal(narrow[0], wide[0])
    assert torch.equal(narrow[2], wide[2].bfloat16())
    assert torch.equal(narrow[3], wide[3].bfloat16())
    kernel = run(lambda *o: adamw_step(*([t] for t in o), *settings),
                 DEVICE, torch.bfloat16)
    assert kernel[2].dtype == kernel[3].dtype == torch.bfloat16
    assert relative_error(kernel[0], narrow[0]) < 1e-6
    for index in (2, 3, 4):
        assert relative_error(kernel[index], narrow[index]) < 1e-5


COMPILE = """
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from coom.kernels.adamw import BLOCK, NUM_WARPS, _step_kernel
signature = {"addresses_ptr": "*i64", "numels_ptr": "*i64",
             "block_tensor_ptr": "*i32", "first_block_ptr": "*i64",
             "tensors": "i32", "bf16_grads": "constexpr",
             "bf16_moments": "constexpr", "write_copies": "constexpr",
             "aligned": "constexpr", "block": "constexpr"}
signature |= {"grad_scale_ptr": "*fp32", "applies_ptr": "*i1"}
signature |= {name: "fp32" for name in (
    "decay", "beta1", "beta2", "step_size",
    "correction2_sqrt", "eps")}
found = {}
for moments in ("float32", "bf16"):
    for aligned in (True, False):
        source = ASTSource(_step_kernel, signature, constexprs={
            "bf16_grads": True, "bf16_moments": moments == "bf16",
            "write_copies": True, "aligned": aligned, "block": BLOCK})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": NUM_WARPS}).asm["ptx"]
        found[f"{moments} {aligned}"] = sorted(set(re.findall(
            r"[ls][dt][.]global[.]v4", ptx)))
print(json.dumps(found))
"""


def test_whole_blocks_move_in_16_byte_vectors():
    """Compiled for an H100 as it ships (block and warps; no GPU needed:
    Triton's compiler, not the interpreter the other tests run): the
    addresses come from a table, and only the alignment the host checks
    lets whole blocks load and store 16 bytes at a time; without it,
    element by element. That way AdamW's step ran 8% slower end to end
    (docs/benchmarks.md, session 24)."""
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    found = json.loads(subprocess.run(
        [sys.executable, "-c", COMPILE], capture_output=True, text=True,
        check=True, env=environment).stdout)
    vectors = ["ld.global.v4", "st.global.v4"]
    assert found == {"float32 True": vectors, "float32 False": [],
                     "bf16 True": vectors, "bf16 False": []}


def test_without_copies_the_rest_steps_alike():
    """Sharded or float32 parameters have no compute copies: the launch
    writes none, and steps the rest as the reference does."""
    torch.manual_seed(5)
    beta1, beta2 = SETTINGS["betas"]
    settings = (SETTINGS["lr"], beta1, beta2, SETTINGS["eps"],
                SETTINGS["weight_decay"], 2)
    start = [torch.randn(4100), torch.randn(4100), torch.randn(4100),
             torch.randn(4100).abs()]
    mine = [t.clone().to(DEVICE) for t in start]
    adamw_step(*([t] for t in mine), [], *settings, _scale(0.7))
    expected = [t.clone() for t in start]
    adamw_step_reference(*expected, None, *settings, 0.7)
    for index in (0, 2, 3):
        assert relative_error(mine[index], expected[index]) < 1e-6


@pytest.mark.parametrize("applies", [False, True])
def test_a_step_the_device_holds_back_changes_nothing(applies):
    """Whether the step applies is read on the device: held back (a
    non-finite step, judged after the launch), parameters, moments and
    copies stay as they were, whatever the scale."""
    torch.manual_seed(6)
    beta1, beta2 = SETTINGS["betas"]
    start = [torch.randn(4100, device=DEVICE) for _ in range(3)] + [
        torch.randn(4100, device=DEVICE).abs(),
        torch.zeros(4100, dtype=torch.bfloat16, device=DEVICE)]
    operands = [[tensor.clone()] for tensor in start]
    adamw_step(*operands, SETTINGS["lr"], beta1, beta2, SETTINGS["eps"],
               SETTINGS["weight_decay"], 1, _scale(float("nan")),
               torch.tensor(applies, device=DEVICE))
    unchanged = [torch.equal(column[0], tensor)
                 for column, tensor in zip(operands, start)]
    assert unchanged == [not applies, True, not applies, not applies,
                         not applies]
    with pytest.raises(ValueError, match="one torch.bool element"):
        adamw_step(*operands, SETTINGS["lr"], beta1, beta2,
                   SETTINGS["eps"], SETTINGS["weight_decay"], 1,
                   _scale(1.0), torch.ones(2, dtype=torch.bool))


def test_unaligned_or_mismatched_operands():
    """A tensor off a 16-byte boundary steps all the same (without the
    vectors); operands of another size or dtype are refused."""
    torch.manual_seed(4)
    beta1, beta2 = SETTINGS["betas"]
    settings = (SETTINGS["lr"], beta1, beta2, SETTINGS["eps"],
                SETTINGS["weight_decay"], 1)
    storage = torch.randn(4100, device=DEVICE)
    param = storage[1:4098]  # 4 bytes past the boundary
    start = param.clone()
    operands = [[param], [torch.randn(4097, device=DEVICE)],
                [torch.zeros(4097, device=DEVICE)],
                [torch.zeros(4097, device=DEVICE)],
                [torch.empty(4097, dtype=torch.bfloat16, device=DEVICE)]]
    expected = [start, operands[1][0], *(torch.zeros(4097, device=DEVICE)
                                         for _ in range(2)),
                torch.empty_like(operands[4][0])]
    adamw_step(*operands, *settings)
    adamw_step_reference(*expected, *settings)
    assert relative_error(param, expected[0]) < 1e-6
    with pytest.raises(ValueError, match="size"):
        adamw_step([param], [torch.randn(7, device=DEVICE)],
                   *operands[2:], *settings)
    with pytest.raises(ValueError, match="not torch.float16"):
        adamw_step([param], [operands[1][0].half()], *operands[2:],
                   *settings)
