"""Rotary position embedding of MLA's rope channels, in Triton.

Forward: channels (2i, 2i+1) of each head form ``z = x_2i + j x_2i+1``,
rotated by the angle of position p = start + token index: ``y = z (c +
j s)`` with ``c = cos_sk[p, i]``, ``s = sin_sk[p, i]``, that is ``y_2i =
x_2i c - x_2i+1 s``, ``y_2i+1 = x_2i s + x_2i+1 c``, computed in float32
and stored in the input's dtype. Backward: a rotation's adjoint is the
rotation by the negative angle, ``dx = dy (c - j s)``, the same kernel
with s negated; the tables get no gradient. Each program rotates every
head of a block of tokens, reading a token's cos and sin once for all its
heads; the input may be a slice, its rows (tokens and heads) any distance
apart (a copy is made when its channels are not contiguous). On the CPU
the op runs the reference.

Tensor names end in their shape: b batch; s sequence; h heads; k rotated
head dimension; t tokens (b * s).
"""
import torch
import triton
import triton.language as tl

ELEMENTS_PER_PROGRAM = 2048
NUM_WARPS = 4


@triton.jit
def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, tokens, seq_len, heads,
                   half, start, token_stride, head_stride,
                   inverse: tl.constexpr, token_block: tl.constexpr,
                   head_block: tl.constexpr, pair_block: tl.constexpr):
    token = (tl.program_id(0).to(tl.int64) * token_block
             + tl.arange(0, token_block))
    head = tl.arange(0, head_block)
    pair = tl.arange(0, pair_block)
    channel = tl.arange(0, 2 * pair_block)
    token_mask = token < tokens
    table = (start + token % seq_len)[:, None] * half + pair[None, :]
    table_mask = token_mask[:, None] & (pair < half)[None, :]
    cos = tl.load(cos_ptr + table, mask=table_mask, other=0.0)
    sin = tl.load(sin_ptr + table, mask=table_mask, other=0.0)
    cos = cos.to(tl.float32)[:, None, :]
    sin = sin.to(tl.float32)[:, None, :]
    if inverse:
        sin = -sin
    mask = (token_mask[:, None, None] & (head < heads)[None, :, None]
            & (channel < 2 * half)[None, None, :])
    x_offsets = (token[:, None, None] * token_stride
                 + head[None, :, None] * head_stride + channel[None, None, :])
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    # Whole rows are loaded and stored, then split into pairs: reading and
    # writing every other channel ran about ten times slower on an H100.
    real, imag = tl.split(
        tl.reshape(x, [token_block, head_block, pair_block, 2]))
    y = tl.join(real * cos - imag * sin, real * sin + imag * cos)
    y = tl.reshape(y, [token_block, head_block, 2 * pair_block])
    y_offsets = ((token[:, None, None] * heads + head[None, :, None])
                 * (2 * half) + channel[None, None, :])
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check_positions(x_bshk: torch.Tensor, cos_sk: torch.Tensor,
                     start: int) -> None:
    end = start + x_bshk.shape[1]
    if end > cos_sk.shape[0]:
        raise ValueError(f"positions up to {end} but tables of "
                         f"{cos_sk.shape[0]}")


@torch.library.custom_op("coom::rope_rotate", mutates_args=())
def rotate(x_bshk: torch.Tensor, cos_sk: torch.Tensor, sin_sk: torch.Tensor,
           start: int, inverse: bool = False) -> torch.Tensor:
    """Rotate x (b, s, h, k) as positions start .. start + s - 1 (by the
    negative angles if inverse); the result is contiguous."""
    _check_positions(x_bshk, cos_sk, start)
    batch, seq_len, heads, width = x_bshk.shape
    x_thk = x_bshk.flatten(0, 1)
    if x_thk.stride(-1) != 1:
        x_thk = x_thk.contiguous()
    y_thk = torch.empty(x_thk.shape, device=x_thk.device, dtype=x_thk.dtype)
    tokens, half = batch * seq_len, width // 2
    head_block = triton.next_power_of_2(heads)
    pair_block = triton.next_power_of_2(half)
    token_block = max(ELEMENTS_PER_PROGRAM // (2 * head_block * pair_block),
                      1)
    if y_thk.numel():
        _rotate_kernel[(triton.cdiv(tokens, token_block),)](
            x_thk, cos_sk.contiguous(), sin_sk.contiguous(), y_thk, tokens,
            seq_len, heads, half, start, x_thk.stride(0), x_thk.stride(1),
            inverse=inverse, token_block=token_block, head_block=head_block,
            pair_block=pair_block, num_warps=NUM_WARPS)
    return y_thk.view(x_bshk.shape)


@rotate.register_kernel("cpu")
def _(x_bshk, cos_sk, sin_sk, start, inverse=False):
    _check_positions(x_bshk, cos_sk, start)
    return rotate_reference(x_bshk, cos_sk, -sin_sk if inverse else sin_sk,
                            start)


@rotate.register_fake
def _(x_bshk, cos_sk, sin_sk, start, inverse=False):
    return x_bshk.new_empty(x_bshk.shape)


def _setup(ctx, inputs, output):
    _, cos_sk, sin_sk, ctx.start, ctx.inverse = inputs
    ctx.save_for_backward(cos_sk, sin_sk)


def _backward(ctx, dy_bshk):
    cos_sk, sin_sk = ctx.saved_tensors
    dx_bshk = rotate(dy_bshk, cos_sk, sin_sk, ctx.start, not ctx.inverse)
    return dx_bshk, None, None, None, None


rotate.register_autograd(_backward, setup_context=_setup)


def rotate_reference(x_bshk: torch.Tensor, cos_sk: torch.Tensor,
                     sin_sk: torch.Tensor, start: int) -> torch.Tensor:
    """The same rotation in plain PyTorch (float32 inside)."""
    end = start + x_bshk.shape[1]
    cos = cos_sk[start:end, None, :]
    sin = sin_sk[start:end, None, :]
    pairs = x_bshk.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack(
        (real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x_bshk)
