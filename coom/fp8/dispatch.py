"""Routed tokens sent to the experts in FP8, as DeepSeek-V3 dispatches
them (``fp8.dispatch``).

Before the experts, each routed copy is rounded to FP8 in 1 x 128 tiles
with float32 scales, the form the experts' FP8 products take it in.
Under expert parallelism (``coom.parallel.expert``) that form is what
travels: the all-to-all moves one byte per entry plus a float32 scale per
128 entries, about half of bf16's bytes, and the receiver expands it back
to the rows' dtype. In one process the rows are rounded the same way, so
every layout computes the same thing. Gradients go back as they are, in
the rows' dtype (as DeepSeek-V3 combines in bf16): the rounding is
straight-through.

Rows quantise in tiles along their own entries only, so a row's FP8
form does not depend on which rows travel with it.

Tensor names end in their shape: c rows sent; r rows received; d width;
h 128-column tiles.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single

from coom.fp8 import ops
from coom.fp8.scaling import E4M3, TILE, Grouping, dequantize, quantize

ROW_TILES = Grouping(1, TILE)


@dataclass(frozen=True)
class FP8Rows:
    """How rows are rounded to FP8 for the journey.

    Args:
        power_of_two: round scales up to powers of two.
        emulate: quantise in plain PyTorch (any device) rather than in
            COOM's Triton kernel (the same values, bit for bit).
    """

    power_of_two: bool = False
    emulate: bool = False

    def quantize(self, x_cd: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(E4M3 values (c, d) as bytes, float32 scales (c, h)), both
        contiguous, ready to send."""
        if x_cd.is_cuda and not self.emulate:
            values, scales = ops.quantize_rows(x_cd, self.power_of_two)
        else:
            values, scales = quantize(x_cd, ROW_TILES, self.power_of_two)
        return values.view(torch.uint8), scales.contiguous()

    @staticmethod
    def expand(values_cd: torch.Tensor, scales_ch: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
        """The rows that values and scales hold, in dtype."""
        return dequantize(values_cd.view(E4M3), scales_ch,
                          ROW_TILES).to(dtype)

    def round(self, x_cd: torch.Tensor) -> torch.Tensor:
        """x's rows as they arrive after the journey (in one process,
        where they make none); the gradient passes as it is."""
        if not (torch.is_grad_enabled() and x_cd.requires_grad):
            return self.expand(*self.quantize(x_cd), x_cd.dtype)
        return _Rounded.apply(x_cd, self.power_of_two, self.emulate)

    def send(self, x_cd: torch.Tensor, received: list[int],
             sent: list[int], group) -> "InFlight":
        """Start sending x's rows in FP8, sent[p] of them to process p of
        group, and receiving received[p] from each."""
        values_cd, scales_ch = self.quantize(x_cd.detach())
        return InFlight(
            x_cd, all_to_all_single(values_cd, received, sent, group),
            all_to_all_single(scales_ch, received, sent, group),
            received, sent, group)


class _Rounded(torch.autograd.Function):
    """``FP8Rows.round`` with its gradient passed through. It takes the
    rows' settings as plain values: torch 2.11's tracing of a Function
    that took a dataclass failed (``coom.fp8.linear``)."""

    @staticmethod
    def forward(ctx, x_cd, power_of_two: bool, emulate: bool):
        rows = FP8Rows(power_of_two, emulate)
        return rows.expand(*rows.quantize(x_cd), x_cd.dtype)

    @staticmethod
    def backward(ctx, grad_cd):
        return grad_cd, None, None


@dataclass
class InFlight:
    """Rows on their way in FP8 (``FP8Rows.send``)."""

    x_cd: torch.Tensor
    values_rd: torch.Tensor
    scales_rh: torch.Tensor
    received: list[int]
    sent: list[int]
    group: object

    def arrived(self) -> torch.Tensor:
        """The received rows in the sent rows' dtype, once they are here
        (work queued before this call overlaps their journey); their
        gradient goes back to the sender's rows in that dtype."""
        if not (torch.is_grad_enabled() and self.x_cd.requires_grad):
            return FP8Rows.expand(self.values_rd, self.scales_rh,
                                  self.x_cd.dtype)
        return _Arrival.apply(self.x_cd, self.values_rd, self.scales_rh,
                              self.sent, self.received, self.group)


class _Arrival(torch.autograd.Function):
    """``InFlight.arrived``, whose backward sends the rows' gradients
    back; plain values in, as in ``_Rounded``."""

    @staticmethod
    def forward(ctx, x_cd, values_rd, scales_rh, sent: list[int],
                received: list[int], group):
        ctx.sizes, ctx.group = (sent, received), group
        return FP8Rows.expand(values_rd, scales_rh, x_cd.dtype)

    @staticmethod
    def backward(ctx, grad_rd):
        sent, received = ctx.sizes
        grad_cd = grad_rd.new_empty(sum(sent), grad_rd.shape[1])
        dist.all_to_all_single(grad_cd, grad_rd.contiguous(),
                               output_split_sizes=sent,
                               input_split_sizes=received, group=ctx.group)
        return grad_cd, None, None, None, None, None
