"""CPU kernels for decode-sized products, in C built on the machine that runs them (`native`).

Unlike the Triton packages these target the CPU: `decode_gemm` is the fp32 GEMM of a decode step's few
rows, with `decode_gemm_ref` (torch) as its definition, and `grouped_decode_gemm` runs a MoE layer's
experts (each its own rows and weight) in one call. `panel_gemm` and `grouped_panel_gemm` compute the
same products from a panel-packed copy of an fp32 weight (`panel_pack`), faster at any row count;
`sigmoid_route` is DeepSeek-V3's expert selection (`sigmoid_route_ref`) in one call. Where
no C compiler or no AVX2/AVX-512 is present, `decode_gemm_available()` is False and callers keep torch's
kernels.
"""

from engram_kernels.cpu_decode.decode_gemm import (
    decode_gemm,
    decode_gemm_available,
    decode_gemm_ref,
    decode_gemm_supports,
    grouped_decode_gemm,
    grouped_decode_gemm_ref,
)
from engram_kernels.cpu_decode.moe_router import sigmoid_route, sigmoid_route_ref
from engram_kernels.cpu_decode.panel_gemm import grouped_panel_gemm, panel_gemm, panel_pack, panel_unpack, panel_width

__all__ = ["decode_gemm", "decode_gemm_available", "decode_gemm_ref", "decode_gemm_supports", "grouped_decode_gemm",
           "grouped_decode_gemm_ref", "grouped_panel_gemm", "panel_gemm", "panel_pack", "panel_unpack", "panel_width",
           "sigmoid_route", "sigmoid_route_ref"]
