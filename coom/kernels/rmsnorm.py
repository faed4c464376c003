"""RMSNorm, and RMSNorm fused with the residual add before it, in Triton.

Forward, per row of width D: ``h = x (+ residual)``, ``rstd =
1 / sqrt(mean(h^2) + eps)``, ``y = h * rstd * weight``, computed in
float32 and stored in the input's dtype. Backward: with ``g = dy *
weight`` and ``n = h * rstd``, ``dh = rstd * (g - n * mean(g * n))`` (plus
the gradient reaching the residual sum), ``dweight = sum over rows of dy *
n``. Each program handles a block of rows, so weight-gradient partial sums
come one per program and are added up afterwards. On the CPU both ops run
the same formulas in plain PyTorch.

Tensor names end in their shape: r rows; d width; p programs.
"""
import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16


@triton.jit
def _forward_kernel(x_ptr, residual_ptr, weight_ptr, y_ptr, h_ptr, rstd_ptr,
                    rows, width, eps, has_residual: tl.constexpr,
                    block: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, block)
    mask = columns < width
    offsets = row * width + columns
    h = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if has_residual:
        h += tl.load(residual_ptr + offsets, mask=mask,
                     other=0.0).to(tl.float32)
        tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / width + eps)
    weight = tl.load(weight_ptr + columns, mask=mask, other=0.0)
    y = h * rstd * weight.to(tl.float32)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _backward_kernel(dy_ptr, dsum_ptr, h_ptr, weight_ptr, rstd_ptr, dh_ptr,
                     dweight_ptr, rows, width, has_dsum: tl.constexpr,
                     row_block: tl.constexpr, block: tl.constexpr):
    program = tl.program_id(0)
    columns = tl.arange(0, block)
    mask = columns < width
    weight = tl.load(weight_ptr + columns, mask=mask,
                     other=0.0).to(tl.float32)
    dweight = tl.zeros([block], dtype=tl.float32)
    for index in range(row_block):
        row = program * row_block + index
        if row < rows:
            offsets = row * width + columns
            dy = tl.load(dy_ptr + offsets, mask=mask,
                         other=0.0).to(tl.float32)
            h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            normed = h * rstd
            g = dy * weight
            dh = rstd * (g - normed * tl.sum(g * normed, axis=0) / width)
            if has_dsum:
                dh += tl.load(dsum_ptr + offsets, mask=mask,
                              other=0.0).to(tl.float32)
            tl.store(dh_ptr + offsets, dh.to(dh_ptr.dtype.element_ty),
                     mask=mask)
            dweight += dy * normed
    tl.store(dweight_ptr + program * width + columns, dweight, mask=mask)


def _block(width: int) -> int:
    return triton.next_power_of_2(width)


@torch.library.custom_op("coom::rms_norm_forward", mutates_args=())
def rms_norm_forward(x: torch.Tensor, residual: torch.Tensor | None,
                     weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    """(y, h, rstd) of rows of h = x (+ residual); without a residual h
    is empty, with one it is stored, as y is, in residual's dtype."""
    width = x.shape[-1]
    x_rd = x.reshape(-1, width).contiguous()
    rows = x_rd.shape[0]
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if residual is None:
        h = x.new_empty(0)
        y = torch.empty_like(x_rd)
        residual_rd = h_rd = x_rd
    else:
        residual_rd = residual.reshape(rows, width).contiguous()
        h_rd = torch.empty_like(residual_rd)
        y = torch.empty_like(residual_rd)
        h = h_rd.view(residual.shape)
    if rows:
        _forward_kernel[(rows,)](
            x_rd, residual_rd, weight, y, h_rd, rstd, rows, width, eps,
            has_residual=residual is not None, block=_block(width))
    return y.view(x.shape), h, rstd


@rms_norm_forward.register_kernel("cpu")
def _(x, residual, weight, eps):
    h32 = x.float() if residual is None else residual.float() + x.float()
    rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    dtype = x.dtype if residual is None else residual.dtype
    y = (h32 * rstd * weight.float()).to(dtype)
    h = x.new_empty(0) if residual is None else h32.to(dtype)
    return y, h, rstd.flatten()


@rms_norm_forward.register_fake
def _(x, residual, weight, eps):
    rstd = x.new_empty(x.shape[:-1].numel(), dtype=torch.float32)
    if residual is None:
        return torch.empty_like(x), x.new_empty(0), rstd
    y = torch.empty_like(residual).view(x.shape)
    return y, torch.empty_like(residual), rstd


@torch.library.custom_op("coom::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: torch.Tensor, dsum: torch.Tensor | None,
                      h: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor,
                                                   torch.Tensor]:
    """(dh, dweight): the gradient of the normalised input (plus dsum, the
    gradient reaching a residual sum) and of the weight."""
    width = h.shape[-1]
    h_rd = h.reshape(-1, width).contiguous()
    rows = h_rd.shape[0]
    dy_rd = dy.reshape(rows, width).contiguous()
    dh = torch.empty_like(h_rd)
    programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
    partial_pd = torch.empty(max(programs, 1), width, device=h.device,
                             dtype=torch.float32)
    if dsum is not None:
        dsum = dsum.reshape(rows, width).contiguous()
    if rows:
        _backward_kernel[(programs,)](
            dy_rd, dsum if dsum is not None else dy_rd, h_rd, weight, rstd,
            dh, partial_pd, rows, width, has_dsum=dsum is not None,
            row_block=ROWS_PER_PROGRAM, block=_block(width))
    else:
        partial_pd.zero_()
    dweight = partial_pd.sum(0).to(weight.dtype)
    return dh.view(h.shape), dweight


@rms_norm_backward.register_kernel("cpu")
def _(dy, dsum, h, weight, rstd):
    width = h.shape[-1]
    dy_rd = dy.reshape(-1, width).float()
    normed_rd = h.reshape(-1, width).float() * rstd[:, None]
    g_rd = dy_rd * weight.float()
    dh_rd = rstd[:, None] * (
        g_rd - normed_rd * (g_rd * normed_rd).mean(-1, keepdim=True))
    if dsum is not None:
        dh_rd = dh_rd + dsum.reshape(-1, width).float()
    dweight = (dy_rd * normed_rd).sum(0)
    return dh_rd.to(h.dtype).view(h.shape), dweight.to(weight.dtype)


@rms_norm_backward.register_fake
def _(dy, dsum, h, weight, rstd):
    return torch.empty_like(h), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, residual, weight, _ = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _backward(ctx, dy, dh_out, drstd):
    h, weight, rstd = ctx.saved_tensors
    if not ctx.has_residual:
        dx, dweight = rms_norm_backward(dy, None, h, weight, rstd)
        return dx, None, dweight, None
    dh, dweight = rms_norm_backward(dy, dh_out, h, weight, rstd)
    return dh.to(ctx.x_dtype), dh, dweight, None


rms_norm_forward.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor,
             eps: float) -> torch.Tensor:
    """RMSNorm of x's last dimension, scaled by weight."""
    return rms_norm_forward(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor,
                 weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, RMSNorm(x + residual)), both in residual's dtype."""
    y, h, _ = rms_norm_forward(x, residual, weight, eps)
    return h, y


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """The same function in plain PyTorch (float32 inside)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).type_as(x)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor,
                           weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm in plain PyTorch."""
    h = residual + x
    return h, rms_norm_reference(h, weight, eps)
