"""The output head fused with the cross-entropy loss, chunked over tokens.

The loss is ``sum_t scale_t * CE(x_t @ W^T, label_t)``: per-token scales
carry the loss mask and the division by the step's token count. Unfused,
the logits of every token (t, v) are materialised, copied to float32 and
kept for the backward: at DeepSeek-V3's vocabulary of 129,280 and 8,192
tokens that is 4 GiB per copy.

Fused, tokens go through in chunks. For each chunk the head's matmul gives
its logits (n, v) in the compute dtype; one Triton program per row finds
the log-sum-exp in float32 with a running maximum, stores the row's loss
``lse - z_label`` and overwrites the logits, in place, with the gradient
``scale_t * (softmax(z) - onehot(label))``. Two matmuls turn that into the
chunk's gradients of x and (accumulated in float32) of W, and the chunk's
logits are freed. The forward therefore computes the gradients as well, as
Liger-Kernel's fused loss does; the backward only multiplies them by the
incoming gradient of the scalar loss. Peak memory is one chunk's logits
plus the float32 weight gradient. On the CPU the same chunks run a plain
PyTorch version of the per-row program.

Tensor names end in their shape: t tokens; n tokens in a chunk; d width;
v vocabulary.
"""
import torch
import triton
import triton.language as tl
from torch.nn import functional

from coom.kernels.autocast import product_dtype

CHUNK_BYTES = 2 ** 29  # at most 512 MiB of logits at a time
BLOCK = 4096  # vocabulary entries a program reads at once


@triton.jit
def _cross_entropy_kernel(logits_ptr, labels_ptr, scale_ptr, loss_ptr,
                          vocab, stride, write_gradient: tl.constexpr,
                          block: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    maximum = -float("inf")
    total = 0.0
    for start in range(0, vocab, block):
        columns = start + tl.arange(0, block)
        z = tl.load(row_ptr + columns, mask=columns < vocab,
                    other=-float("inf")).to(tl.float32)
        new_maximum = tl.maximum(maximum, tl.max(z, axis=0))
        total = total * tl.exp(maximum - new_maximum) \
            + tl.sum(tl.exp(z - new_maximum), axis=0)
        maximum = new_maximum
    lse = maximum + tl.log(total)
    tl.store(loss_ptr + row,
             lse - tl.load(row_ptr + label).to(tl.float32))
    if write_gradient:
        scale = tl.load(scale_ptr + row)
        for start in range(0, vocab, block):
            columns = start + tl.arange(0, block)
            mask = columns < vocab
            z = tl.load(row_ptr + columns, mask=mask).to(tl.float32)
            gradient = tl.exp(z - lse) * scale
            gradient = tl.where(columns == label, gradient - scale,
                                gradient)
            tl.store(row_ptr + columns,
                     gradient.to(logits_ptr.dtype.element_ty), mask=mask)


def chunk_rows(vocab: int, element_size: int) -> int:
    """Tokens per chunk: CHUNK_BYTES of logits, a multiple of 128."""
    return max(128, CHUNK_BYTES // (vocab * element_size) // 128 * 128)


def _accumulate(grad_vd: torch.Tensor, a_vn: torch.Tensor,
                b_nd: torch.Tensor) -> torch.Tensor:
    """grad + a @ b, summed in grad's float32."""
    if a_vn.dtype == grad_vd.dtype:
        return grad_vd.addmm_(a_vn, b_nd)
    if a_vn.is_cuda or a_vn.is_meta:
        return torch.addmm(grad_vd, a_vn, b_nd, out_dtype=grad_vd.dtype)
    return grad_vd.add_(a_vn @ b_nd)


def _triton_rows(logits_nv: torch.Tensor, labels_n: torch.Tensor,
                 scale_n: torch.Tensor, loss_n: torch.Tensor,
                 gradients: bool) -> None:
    vocab = logits_nv.shape[1]
    _cross_entropy_kernel[(logits_nv.shape[0],)](
        logits_nv, labels_n, scale_n, loss_n, vocab, logits_nv.stride(0),
        write_gradient=gradients,
        block=min(BLOCK, triton.next_power_of_2(vocab)))


def _reference_rows(logits_nv: torch.Tensor, labels_n: torch.Tensor,
                    scale_n: torch.Tensor, loss_n: torch.Tensor,
                    gradients: bool) -> None:
    """What the kernel does to a chunk, in plain PyTorch."""
    z_nv = logits_nv.float()
    lse_n = z_nv.logsumexp(-1)
    loss_n.copy_(lse_n - z_nv.gather(1, labels_n[:, None]).squeeze(1))
    if gradients:
        gradient_nv = (z_nv - lse_n[:, None]).exp() * scale_n[:, None]
        gradient_nv.scatter_add_(1, labels_n[:, None], -scale_n[:, None])
        logits_nv.copy_(gradient_nv)


def _chunked(x_td: torch.Tensor, weight_vd: torch.Tensor,
             labels_t: torch.Tensor, scale_t: torch.Tensor,
             compute_dtype: torch.dtype, rows: int, gradients: bool,
             cross_entropy_rows
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused loss, chunk by chunk, cross_entropy_rows turning each
    chunk's logits into losses (and gradients, in place)."""
    tokens = x_td.shape[0]
    x_td = x_td.contiguous()
    weight_vd = weight_vd.to(compute_dtype)
    labels_t = labels_t.contiguous()
    scale_t = scale_t.float().contiguous()
    loss_t = torch.empty(tokens, device=x_td.device, dtype=torch.float32)
    grad_x_td = torch.empty_like(x_td) if gradients else x_td.new_empty(0)
    grad_w_vd = (x_td.new_zeros(weight_vd.shape, dtype=torch.float32)
                 if gradients else x_td.new_empty(0))
    for start in range(0, tokens, rows):
        end = min(start + rows, tokens)
        x_nd = x_td[start:end].to(compute_dtype)
        logits_nv = x_nd @ weight_vd.T
        cross_entropy_rows(logits_nv, labels_t[start:end],
                           scale_t[start:end], loss_t[start:end], gradients)
        if gradients:
            grad_x_td[start:end] = logits_nv @ weight_vd
            grad_w_vd = _accumulate(grad_w_vd, logits_nv.T, x_nd)
    return (loss_t * scale_t).sum(), grad_x_td, grad_w_vd


@torch.library.custom_op("coom::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_forward(
        x_td: torch.Tensor, weight_vd: torch.Tensor, labels_t: torch.Tensor,
        scale_t: torch.Tensor, compute_dtype: torch.dtype, rows: int,
        gradients: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dx, dloss/dW) with matmuls in compute_dtype, rows
    tokens at a time; without gradients the last two are empty."""
    return _chunked(x_td, weight_vd, labels_t, scale_t, compute_dtype, rows,
                    gradients, _triton_rows)


@linear_cross_entropy_forward.register_kernel("cpu")
def _(x_td, weight_vd, labels_t, scale_t, compute_dtype, rows, gradients):
    return _chunked(x_td, weight_vd, labels_t, scale_t, compute_dtype, rows,
                    gradients, _reference_rows)


@linear_cross_entropy_forward.register_fake
def _(x_td, weight_vd, labels_t, scale_t, compute_dtype, rows, gradients):
    loss = x_td.new_empty((), dtype=torch.float32)
    if not gradients:
        return loss, x_td.new_empty(0), x_td.new_empty(0)
    return (loss, torch.empty_like(x_td),
            weight_vd.new_empty(weight_vd.shape, dtype=torch.float32))


def _setup(ctx, inputs, output):
    _, grad_x_td, grad_w_vd = output
    ctx.weight_dtype = inputs[1].dtype
    ctx.save_for_backward(grad_x_td, grad_w_vd)


def _backward(ctx, dloss, _dgrad_x, _dgrad_w):
    grad_x_td, grad_w_vd = ctx.saved_tensors
    return (grad_x_td * dloss, (grad_w_vd * dloss).to(ctx.weight_dtype),
            None, None, None, None, None)


linear_cross_entropy_forward.register_autograd(_backward,
                                               setup_context=_setup)


def linear_cross_entropy(x_td: torch.Tensor, weight_vd: torch.Tensor,
                         labels_t: torch.Tensor,
                         scale_t: torch.Tensor) -> torch.Tensor:
    """sum_t scale_t * cross_entropy(x_t @ weight^T, label_t), without the
    full logits; the matmuls run in autocast's dtype when it is on. No
    gradient reaches scale_t."""
    compute_dtype = product_dtype(x_td)
    gradients = torch.is_grad_enabled() and (
        x_td.requires_grad or weight_vd.requires_grad)
    element_size = torch.empty((), dtype=compute_dtype).element_size()
    loss, _, _ = linear_cross_entropy_forward(
        x_td, weight_vd, labels_t, scale_t, compute_dtype,
        chunk_rows(weight_vd.shape[0], element_size), gradients)
    return loss


def linear_cross_entropy_reference(x_td: torch.Tensor,
                                   weight_vd: torch.Tensor,
                                   labels_t: torch.Tensor,
                                   scale_t: torch.Tensor) -> torch.Tensor:
    """The same loss, unfused: every logit materialised, then float32."""
    logits_tv = functional.linear(x_td, weight_vd)
    per_token = functional.cross_entropy(logits_tv.float(), labels_t,
                                         reduction="none")
    return (per_token * scale_t).sum()
