"""FP8 E4M3 quantization: per-token activation blocks and DeepSeek's 2-D weight tiles.

Each op has a torch reference (`*_ref`, the definition), a Triton kernel (`*_triton`) and a
dispatcher that picks one. Matrix multiplication on quantized operands lives in `engram_kernels.gemm`.
"""

from engram_kernels.quant.fp8_block import (
    dequantize_fp8_block,
    dequantize_fp8_block_ref,
    quantize_fp8_block,
    quantize_fp8_block_ref,
)
from engram_kernels.quant.fp8_block_kernel import dequantize_fp8_block_triton, quantize_fp8_block_triton
from engram_kernels.quant.fp8_format import FP8_E4M3_MAX
from engram_kernels.quant.fp8_weight import dequantize_fp8_weight, dequantize_fp8_weight_ref, quantize_fp8_weight_ref
from engram_kernels.quant.fp8_weight_kernel import dequantize_fp8_weight_triton

__all__ = [
    "FP8_E4M3_MAX",
    "dequantize_fp8_block",
    "dequantize_fp8_block_ref",
    "dequantize_fp8_block_triton",
    "dequantize_fp8_weight",
    "dequantize_fp8_weight_ref",
    "dequantize_fp8_weight_triton",
    "quantize_fp8_block",
    "quantize_fp8_block_ref",
    "quantize_fp8_block_triton",
    "quantize_fp8_weight_ref",
]
