"""Matrix multiplication on FP8 operands: the block-scaled FP8 GEMM and the FP8 linear layer built on it.

Each op has a torch reference (`*_ref`, the definition), a Triton kernel (`*_triton`) and a
dispatcher. Quantization itself lives in `engram_kernels.quant`.
"""

from engram_kernels.gemm.fp8_gemm import fp8_gemm, fp8_gemm_ref
from engram_kernels.gemm.fp8_gemm_kernel import fp8_gemm_triton
from engram_kernels.gemm.fp8_linear import fp8_linear

__all__ = ["fp8_gemm", "fp8_gemm_ref", "fp8_gemm_triton", "fp8_linear"]
