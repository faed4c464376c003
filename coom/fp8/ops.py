"""The FP8 Triton kernels, and cuBLAS's scaled product, as
``torch.library`` ops.

The quantisation ops are ``triton_op``: eager calls
run the kernels directly, and ``torch.compile`` traces through them
(their allocations and index arithmetic become graph nodes, each launch
a node of its own) so that inductor launches the kernels from its
generated code, without a Python op and Triton's launcher on every call:
the FP8 step was waiting on the host (``docs/benchmarks.md``). Their
fake (meta) implementations are the functions themselves, traced on fake
tensors.

The products are ``custom_op``, which inductor keeps whole: the grouped
products, whose autotuned configs include a register cap (maxnreg) that
inductor's own autotuning of a traced kernel drops (torch 2.13's source;
traced, the forward's and input gradient's 66 launches per step of the
``small`` preset took 22.0 ms of an H100 against 19.5 ms whole), and
whose TMA descriptors need Triton's allocator set in the launching
thread (``coom.fp8.grouped_gemm``), which inductor's launches
would not do; and cuBLAS's scaled product, which inductor would
otherwise lower to a template of its own.

The kernels are ``coom.fp8.quantize`` and
``coom.fp8.grouped_gemm``; this file only wraps them. Scales
of 1 x 128 tiles come back outer-dim-major (strides (1, rows)); x^T
quantised in groups (experts) comes back tile-padded, 128 columns per
row tile (``quantize_transposed``).

Tensor names end in their shape: m rows; k columns; h column tiles; j
row tiles; c columns of x^T's values (m, or 128 j tile-padded); e
experts; n weight rows; g weight row blocks.
"""
from typing import Optional

import torch

from coom.fp8 import grouped_gemm, quantize


@torch.library.triton_op("coom::fp8_quantize_rows_and_transpose",
                         mutates_args=())
def quantize_rows_and_transpose(
        x_mk: torch.Tensor, power_of_two: bool,
        counts_e: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x in 1 x 128 tiles, and x^T in 1 x 128 tiles along m (each group
    of counts_e rows starting a new tile, tile-padded): (values_mk,
    scales_mh, values_kc, scales_kj)."""
    (values_mk, scales_mh), (values_kc, scales_kj) = (
        quantize.quantize_rows_and_transpose(x_mk, power_of_two, counts_e,
                                             traceable=True))
    return values_mk, scales_mh, values_kc, scales_kj


@torch.library.triton_op("coom::fp8_swiglu_rows_and_transpose",
                         mutates_args=())
def swiglu_rows_and_transpose(
        gate_mk: torch.Tensor, up_mk: torch.Tensor, power_of_two: bool,
        counts_e: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_rows_and_transpose`` of silu(gate) * up, without
    writing the gated product: (values_mk, scales_mh, values_kc,
    scales_kj)."""
    (values_mk, scales_mh), (values_kc, scales_kj) = (
        quantize.swiglu_rows_and_transpose(gate_mk, up_mk, power_of_two,
                                           counts_e, traceable=True))
    return values_mk, scales_mh, values_kc, scales_kj


@torch.library.triton_op("coom::fp8_gathered_rows_and_transpose",
                         mutates_args=())
def gathered_rows_and_transpose(
        x_td: torch.Tensor, sources_c: torch.Tensor, power_of_two: bool,
        counts_e: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_rows_and_transpose`` of x[sources], reading each row
    where it is: (values_cd, scales_ch, values_dc, scales_dj)."""
    (values_cd, scales_ch), (values_dc, scales_dj) = (
        quantize.gathered_rows_and_transpose(x_td, sources_c, power_of_two,
                                             counts_e, traceable=True))
    return values_cd, scales_ch, values_dc, scales_dj


@torch.library.triton_op("coom::fp8_quantize_rows", mutates_args=())
def quantize_rows(x_mk: torch.Tensor, power_of_two: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x in 1 x 128 tiles, for a product that keeps nothing for a
    backward: (values_mk, scales_mh)."""
    return quantize.quantize_rows(x_mk, power_of_two, traceable=True)


@torch.library.triton_op("coom::fp8_quantize_blocks", mutates_args=())
def quantize_blocks(w: torch.Tensor, power_of_two: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., n, k) in 128 x 128 blocks, for a product that keeps
    nothing for a backward: (values (..., n, k), scales (..., g, h))."""
    return quantize.quantize_blocks(w, power_of_two, traceable=True)


@torch.library.triton_op("coom::fp8_quantize_blocks_and_transpose",
                         mutates_args=())
def quantize_blocks_and_transpose(
        w: torch.Tensor, power_of_two: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (..., n, k) in 128 x 128 blocks: (values (..., n, k), scales
    (..., g, h), values of w^T (..., k, n))."""
    return quantize.quantize_blocks(w, power_of_two, transpose=True,
                                    traceable=True)


@torch.library.custom_op("coom::fp8_grouped_mm", mutates_args=())
def grouped_mm(a_values_tk: torch.Tensor, a_scales_th: torch.Tensor,
               b_values_enk: torch.Tensor, b_scales_egh: torch.Tensor,
               counts_e: torch.Tensor, out_dtype: torch.dtype
               ) -> torch.Tensor:
    """Rows of group e times b[e]^T, blockwise scaled."""
    return grouped_gemm.grouped_fp8_mm(
        a_values_tk, a_scales_th, b_values_enk, b_scales_egh.contiguous(),
        counts_e, out_dtype)


@grouped_mm.register_fake
def _(a_values_tk, a_scales_th, b_values_enk, b_scales_egh, counts_e,
      out_dtype):
    return a_values_tk.new_empty(a_values_tk.shape[0],
                                 b_values_enk.shape[1], dtype=out_dtype)


@torch.library.custom_op("coom::fp8_grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(a_values_nc: torch.Tensor, a_scales_nj: torch.Tensor,
                     b_values_kc: torch.Tensor, b_scales_kj: torch.Tensor,
                     counts_e: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """Per group e, a's columns of e times b's columns of e transposed,
    both tile-padded: (e, n, k), summed in float32 and stored in
    out_dtype."""
    return grouped_gemm.grouped_fp8_mm_wgrad(
        a_values_nc, a_scales_nj, b_values_kc, b_scales_kj, counts_e,
        out_dtype)


@grouped_mm_wgrad.register_fake
def _(a_values_nc, a_scales_nj, b_values_kc, b_scales_kj, counts_e,
      out_dtype):
    return a_values_nc.new_empty(len(counts_e), a_values_nc.shape[0],
                                 b_values_kc.shape[0], dtype=out_dtype)


@torch.library.custom_op("coom::fp8_scaled_mm", mutates_args=())
def scaled_mm(a_values_mk: torch.Tensor, b_values_kn: torch.Tensor,
              scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """``torch._scaled_mm`` (cuBLAS) as it is, kept opaque to inductor."""
    return torch._scaled_mm(a_values_mk, b_values_kn, scale_a=scale_a,
                            scale_b=scale_b, out_dtype=out_dtype)


@scaled_mm.register_fake
def _(a_values_mk, b_values_kn, scale_a, scale_b, out_dtype):
    return a_values_mk.new_empty(a_values_mk.shape[0], b_values_kn.shape[1],
                                 dtype=out_dtype)
