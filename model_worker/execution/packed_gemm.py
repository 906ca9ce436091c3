"""oneDNN-prepacked weights: the same CPU GEMMs, read from a copy of the weight in oneDNN's blocked layout.

torch's default CPU GEMM for `F.linear` (MKL) runs decode-sized products far below this machine's
memory bandwidth on some CPUs: on the AMD EPYC (Zen 4) host of benchmarks/weight_layout.py (quick run),
4 rows through a [4096, 768] fp32 weight took 2.0 ms as x @ W^T (6.3 GB/s of weight read) and 0.67 ms in
the best other form. oneDNN's matmul, given the weight reordered once into the blocked layout it picks
for this CPU (`torch.ops.mkldnn._reorder_linear_weight`, the packing PyTorch's Inductor applies to frozen
CPU Linears), took 0.50 ms; at 16 rows it was 1.9x faster than the best other form, and at one bf16 row
1.9-2.6x faster than torch's GEMV. For some small weights at 1 or 4 rows it is slower, hence the per-shape
choice (`execution.cpu_gemm.choice_wins`).

Packs are explicit: `pack(weight)` keeps a packed copy beside the dense weight (`execution.weight_copies`:
twice the memory; repacked when the weight changes, released with it). `CausalLM.arrange_weights` packs
the weights a decode step runs when this host's measurement says packing pays (`execution.cpu_gemm`) and
our panel kernel does not take them (`execution.panel_packs`).
"""

from __future__ import annotations

import torch

from model_worker.execution.weight_copies import WeightCopies

_mkldnn = getattr(torch.ops, "mkldnn", None)


def _ops_present() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and _mkldnn is not None and \
            hasattr(_mkldnn, "_linear_pointwise") and hasattr(_mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


_AVAILABLE = _ops_present()


def _bf16_supported() -> bool:
    try:
        return bool(_mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack this weight here: a 2-D fp32 (or bf16, where this CPU runs oneDNN bf16) CPU
    tensor with real storage."""
    if not _AVAILABLE or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.device.type != "cpu":
        return False
    if weight.is_meta or weight.numel() == 0:
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _bf16_supported())


def pack_copy(weight: torch.Tensor) -> torch.Tensor:
    """A packed copy of a packable weight [out, in], not kept (`pack` keeps one for `linear`)."""
    with torch.inference_mode(False), torch.no_grad():
        return _mkldnn._reorder_linear_weight(weight.detach())


_packs = WeightCopies(pack_copy, packable)


def pack(weight: torch.Tensor) -> bool:
    """Keep a oneDNN-packed copy of `weight` [out, in] for `linear`; False (and nothing kept) if not packable."""
    return _packs.keep(weight)


def unpack(weight: torch.Tensor) -> None:
    """Release the packed copy of `weight`, if any."""
    _packs.release(weight)


def packed(weight: torch.Tensor) -> torch.Tensor | None:
    """The packed copy of this weight tensor (repacked first if the weight changed), or None if not packed."""
    return _packs.get(weight)


def packed_count() -> int:
    """How many weights hold a packed copy (tests and benchmarks)."""
    return _packs.count()


def packed_bytes() -> int:
    """Bytes of the values the packed copies hold (their extra memory, before oneDNN's block padding)."""
    return _packs.nbytes()


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] (the weight's dtype) times a packed weight [out, in], plus bias -> [..., out]."""
    return _mkldnn._linear_pointwise(x, packed_weight, bias, "none", [None], "")


def packed_linear_add(out: torch.Tensor, x: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    """out + x @ W^T in one oneDNN call (its fused "add" post-op): out [M, out], x [M, in] -> [M, out]."""
    return _mkldnn._linear_pointwise.binary(x, out, packed_weight, None, "add")
