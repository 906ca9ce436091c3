"""Tensor kernels: each op is a plain-torch reference (`*_ref`, the definition) plus a Triton kernel.

Subpackages group ops by domain (`quant`, `gemm`, `mhc`, `engram`); `dispatch` decides which
implementation runs. Nothing here knows about models, engines or serving.
"""
