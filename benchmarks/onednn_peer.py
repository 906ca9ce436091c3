"""oneDNN with prepacked weights, as a peer in the GEMM benchmarks only: the packing PyTorch's Inductor applies
to frozen CPU Linears (`torch.ops.mkldnn._reorder_linear_weight`, run by `_linear_pointwise`). The engine no
longer runs it: our C panel kernel beat it at every fp32 shape of the model (`weight_layout.py`), so it stays
here as the library rival those figures are measured against."""

from __future__ import annotations

import torch

_mkldnn = getattr(torch.ops, "mkldnn", None)


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack this weight here: a 2-D fp32 (or bf16, where this CPU runs oneDNN bf16) CPU tensor."""
    try:
        present = torch.backends.mkldnn.is_available() and _mkldnn is not None and \
            hasattr(_mkldnn, "_linear_pointwise") and hasattr(_mkldnn, "_reorder_linear_weight")
        bf16 = present and bool(_mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    if not present or weight.dim() != 2 or weight.device.type != "cpu" or weight.numel() == 0:
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and bf16)


def pack_copy(weight: torch.Tensor) -> torch.Tensor:
    """A oneDNN-packed copy of a packable weight [out, in]."""
    with torch.inference_mode(False), torch.no_grad():
        return _mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] (the weight's dtype) times a packed weight [out, in] -> [..., out]."""
    return _mkldnn._linear_pointwise(x, packed_weight, None, "none", [None], "")
