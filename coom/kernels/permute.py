"""Token permutation around the grouped experts, in Triton.

Both directions are driven by ``copy_tk``, the position of token t's j-th
copy among the expert-sorted copies, so that each program owns whole
tokens and nothing is written twice (no atomics):

- ``permute``: ``x_cd[copy[t, j]] = x_td[t]``; each token row is read once
  and written k times. Backward: ``dx[t] = sum_j dx_cd[copy[t, j]]``.
- ``unpermute`` (the combine): ``out[t] = sum_j w[t, j] y[copy[t, j]]``,
  summed in float32 and stored in y's dtype. Backward: ``dy[copy[t, j]] =
  w[t, j] dout[t]`` and ``dw[t, j] = dot(y[copy[t, j]], dout[t])``.

So a permute's backward is an unweighted unpermute, and an unpermute's
backward a weighted permute. Each program handles a block of tokens, each
as one block of the full width. On the CPU the ops run their references
(and the unpermute's backward the same formulas in plain PyTorch).

Tensor names end in their shape: t tokens; k copies per token; c copies
(t * k); d width.
"""
import torch
import triton
import triton.language as tl

ELEMENTS_PER_PROGRAM = 2048
NUM_WARPS = 4


@triton.jit
def _scatter_kernel(x_ptr, weights_ptr, copy_ptr, y_ptr, out_ptr,
                    dweights_ptr, tokens, width, k: tl.constexpr,
                    weighted: tl.constexpr, row_block: tl.constexpr,
                    block: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * row_block
            + tl.arange(0, row_block))
    columns = tl.arange(0, block)
    row_mask = rows < tokens
    mask = row_mask[:, None] & (columns < width)[None, :]
    x = tl.load(x_ptr + rows[:, None] * width + columns[None, :], mask=mask,
                other=0.0)
    for j in tl.static_range(k):
        copy = tl.load(copy_ptr + rows * k + j, mask=row_mask, other=0)
        offsets = copy[:, None] * width + columns[None, :]
        if weighted:
            weight = tl.load(weights_ptr + rows * k + j, mask=row_mask)
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
            dweight = tl.sum(y.to(tl.float32) * x.to(tl.float32), axis=1)
            tl.store(dweights_ptr + rows * k + j, dweight, mask=row_mask)
            value = x.to(tl.float32) * weight.to(tl.float32)[:, None]
            tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(out_ptr + offsets, x, mask=mask)


@triton.jit
def _gather_kernel(y_ptr, weights_ptr, copy_ptr, out_ptr, tokens, width,
                   k: tl.constexpr, weighted: tl.constexpr,
                   row_block: tl.constexpr, block: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * row_block
            + tl.arange(0, row_block))
    columns = tl.arange(0, block)
    row_mask = rows < tokens
    mask = row_mask[:, None] & (columns < width)[None, :]
    total = tl.zeros([row_block, block], tl.float32)
    for j in tl.static_range(k):
        copy = tl.load(copy_ptr + rows * k + j, mask=row_mask, other=0)
        y = tl.load(y_ptr + copy[:, None] * width + columns[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        if weighted:
            weight = tl.load(weights_ptr + rows * k + j, mask=row_mask)
            y *= weight.to(tl.float32)[:, None]
        total += y
    tl.store(out_ptr + rows[:, None] * width + columns[None, :],
             total.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, tokens: int, width: int, *args, **constants) -> None:
    block = triton.next_power_of_2(width)
    row_block = max(1, ELEMENTS_PER_PROGRAM // block)
    if tokens:
        kernel[(triton.cdiv(tokens, row_block),)](
            *args, tokens, width, row_block=row_block, block=block,
            num_warps=NUM_WARPS, **constants)


@torch.library.custom_op("coom::permute", mutates_args=())
def permute(x_td: torch.Tensor, copy_tk: torch.Tensor) -> torch.Tensor:
    """x_cd: token t's row copied to rows copy_tk[t] (expert-sorted)."""
    tokens, k = copy_tk.shape
    x_td = x_td.contiguous()
    x_cd = x_td.new_empty(tokens * k, x_td.shape[1])
    _launch(_scatter_kernel, tokens, x_td.shape[1], x_td, x_td, copy_tk,
            x_td, x_cd, x_td, k=k, weighted=False)
    return x_cd


@permute.register_kernel("cpu")
def _(x_td, copy_tk):
    return permute_reference(x_td, copy_tk)


@permute.register_fake
def _(x_td, copy_tk):
    return x_td.new_empty(copy_tk.numel(), x_td.shape[1])


@torch.library.custom_op("coom::unpermute", mutates_args=())
def unpermute(y_cd: torch.Tensor, weights_tk: torch.Tensor | None,
              copy_tk: torch.Tensor) -> torch.Tensor:
    """out_td[t] = sum_j weights_tk[t, j] * y_cd[copy_tk[t, j]] (without
    weights, a plain sum), in float32, stored in y's dtype."""
    tokens, k = copy_tk.shape
    y_cd = y_cd.contiguous()
    out_td = y_cd.new_empty(tokens, y_cd.shape[1])
    weighted = weights_tk is not None
    weights_tk = weights_tk.contiguous() if weighted else y_cd
    _launch(_gather_kernel, tokens, y_cd.shape[1], y_cd, weights_tk,
            copy_tk, out_td, k=k, weighted=weighted)
    return out_td


@unpermute.register_kernel("cpu")
def _(y_cd, weights_tk, copy_tk):
    return unpermute_reference(y_cd, weights_tk, copy_tk)


@unpermute.register_fake
def _(y_cd, weights_tk, copy_tk):
    return y_cd.new_empty(copy_tk.shape[0], y_cd.shape[1])


@torch.library.custom_op("coom::unpermute_backward", mutates_args=())
def unpermute_backward(dout_td: torch.Tensor, y_cd: torch.Tensor,
                       weights_tk: torch.Tensor, copy_tk: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy_cd, dweights_tk) of the weighted unpermute."""
    tokens, k = copy_tk.shape
    dout_td, y_cd = dout_td.contiguous(), y_cd.contiguous()
    dy_cd = torch.empty_like(y_cd)
    dweights_tk = torch.empty(tokens, k, device=y_cd.device,
                              dtype=torch.float32)
    _launch(_scatter_kernel, tokens, y_cd.shape[1], dout_td,
            weights_tk.contiguous(), copy_tk, y_cd, dy_cd, dweights_tk, k=k,
            weighted=True)
    return dy_cd, dweights_tk.to(weights_tk.dtype)


@unpermute_backward.register_kernel("cpu")
def _(dout_td, y_cd, weights_tk, copy_tk):
    dout_t1d = dout_td.float()[:, None]
    dy_cd = torch.empty_like(y_cd)
    dy_cd[copy_tk] = (dout_t1d * weights_tk[..., None].float()).to(
        y_cd.dtype)
    dweights_tk = (y_cd[copy_tk].float() * dout_t1d).sum(-1)
    return dy_cd, dweights_tk.to(weights_tk.dtype)


@unpermute_backward.register_fake
def _(dout_td, y_cd, weights_tk, copy_tk):
    return torch.empty_like(y_cd), torch.empty_like(weights_tk)


def _setup_permute(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward_permute(ctx, dx_cd):
    copy_tk, = ctx.saved_tensors
    return unpermute(dx_cd, None, copy_tk), None


permute.register_autograd(_backward_permute, setup_context=_setup_permute)


def _setup_unpermute(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_unpermute(ctx, dout_td):
    y_cd, weights_tk, copy_tk = ctx.saved_tensors
    if weights_tk is None:
        return permute(dout_td, copy_tk), None, None
    dy_cd, dweights_tk = unpermute_backward(dout_td, y_cd, weights_tk,
                                            copy_tk)
    return dy_cd, dweights_tk, None


unpermute.register_autograd(_backward_unpermute,
                            setup_context=_setup_unpermute)


def copy_positions(order_c: torch.Tensor, k: int) -> torch.Tensor:
    """copy_tk, the inverse of order_c (the flat (t, k) index of each
    sorted copy), by a scatter rather than a second sort."""
    copy_c = torch.empty_like(order_c)
    copy_c[order_c] = torch.arange(order_c.numel(), device=order_c.device)
    return copy_c.view(-1, k)


def permute_reference(x_td: torch.Tensor,
                      copy_tk: torch.Tensor) -> torch.Tensor:
    """permute in plain PyTorch: a gather of each copy's token."""
    order_c = torch.empty_like(copy_tk).view(-1)
    order_c[copy_tk.flatten()] = torch.arange(order_c.numel(),
                                              device=order_c.device)
    return x_td[order_c // copy_tk.shape[1]]


def unpermute_reference(y_cd: torch.Tensor,
                        weights_tk: torch.Tensor | None,
                        copy_tk: torch.Tensor) -> torch.Tensor:
    """unpermute in plain PyTorch (float32 inside)."""
    y_tkd = y_cd[copy_tk].float()
    if weights_tk is not None:
        y_tkd = y_tkd * weights_tk[..., None].float()
    return y_tkd.sum(1).to(y_cd.dtype)
