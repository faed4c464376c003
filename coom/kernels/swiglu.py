"""SwiGLU's gating, ``silu(gate) * up``, fused forward and backward in
Triton.

Forward, elementwise: ``s = sigmoid(g) = 1 / (1 + exp(-g))``, ``y =
g * s * u``, computed in float32 and stored in the input's dtype.
Backward, recomputing s from the saved inputs: ``du = dy * g * s``, ``dg
= dy * u * s * (1 + g * (1 - s))``, both written by one kernel. Each
program handles one contiguous block of the flattened tensors. On the
CPU the forward is the reference and the backward the same formulas in
plain PyTorch.

Tensor names end in their shape: n elements.
"""
import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _forward_kernel(gate_ptr, up_ptr, y_ptr, numel, block: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * block + tl.arange(0, block)
    mask = offsets < numel
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, numel,
                     block: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * block + tl.arange(0, block)
    mask = offsets < numel
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dgate_ptr + offsets, dgate.to(dgate_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dup_ptr + offsets, (dy * g * s).to(dup_ptr.dtype.element_ty),
             mask=mask)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1)


@torch.library.custom_op("coom::swiglu", mutates_args=())
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of two tensors of one shape, fused, in gate's
    dtype."""
    gate_n, up_n = _flat(gate), _flat(up)
    y_n = torch.empty_like(gate_n)
    numel = gate_n.numel()
    if numel:
        _forward_kernel[(triton.cdiv(numel, BLOCK),)](
            gate_n, up_n, y_n, numel, block=BLOCK, num_warps=NUM_WARPS)
    return y_n.view(gate.shape)


@swiglu.register_kernel("cpu")
def _(gate, up):
    return swiglu_reference(gate, up)


@swiglu.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("coom::swiglu_backward", mutates_args=())
def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor,
                    up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup), each in its input's dtype."""
    gate_n, up_n = _flat(gate), _flat(up)
    dgate_n, dup_n = torch.empty_like(gate_n), torch.empty_like(up_n)
    numel = gate_n.numel()
    if numel:
        _backward_kernel[(triton.cdiv(numel, BLOCK),)](
            _flat(dy), gate_n, up_n, dgate_n, dup_n, numel,
            block=BLOCK, num_warps=NUM_WARPS)
    return dgate_n.view(gate.shape), dup_n.view(up.shape)


@swiglu_backward.register_kernel("cpu")
def _(dy, gate, up):
    dy, g, u = dy.float(), gate.float(), up.float()
    s = torch.sigmoid(g)
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    return dgate.to(gate.dtype), (dy * g * s).to(up.dtype)


@swiglu_backward.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    return swiglu_backward(dy, *ctx.saved_tensors)


swiglu.register_autograd(_backward, setup_context=_setup)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The same function in plain PyTorch (rounded to the input dtype
    after the silu and after the product)."""
    return torch.nn.functional.silu(gate) * up
