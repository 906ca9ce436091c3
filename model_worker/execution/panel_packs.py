"""Panel-packed copies of fp32 weights for our C panel GEMM (`engram_kernels.cpu_decode.panel_gemm`).

Where our C kernels run (`execution.policy`), `CausalLM.arrange_weights` gives every fp32 weight a step runs as
a GEMM the PANEL method (`execution.linear_methods`), which keeps a panel-packed copy of it made here: any
number of rows of x run through it, decode and prefill alike. A MoE layer's expert stack [E, out, in] is
packed whole (`pack_stack`), so that all its experts run in one grouped call (`execution.experts`), and
each expert's weight view gets the slice of that copy as its own, so the stack costs one copy, not two.
Copies are kept per weight object and remade when the weight changes (`execution.weight_copies`).
"""

from __future__ import annotations

import torch

from engram_kernels.cpu_decode import panel_pack, panel_width
from model_worker.execution.weight_copies import WeightCopies


def packable(weight: torch.Tensor) -> bool:
    """Whether the panel kernel can take this weight here: an fp32 CPU [out, in] or stack [E, out, in] with
    real storage, and the kernel built on this machine."""
    return (isinstance(weight, torch.Tensor) and weight.dim() in (2, 3) and weight.dtype == torch.float32
            and weight.device.type == "cpu" and not weight.is_meta and weight.numel() > 0 and panel_width() > 0)


_panels = WeightCopies(panel_pack, packable)


def pack(weight: torch.Tensor) -> bool:
    """Keep a panel-packed copy of weight [out, in]; False (and nothing kept) if the kernel cannot take it."""
    return _panels.keep(weight)


def pack_stack(stack: torch.Tensor, views: tuple[torch.Tensor, ...]) -> bool:
    """Keep a panel-packed copy of an expert stack [E, out, in] and give its per-expert views (`views[e]` is
    stack[e]) the matching slice of it; False (and nothing kept) if the kernel cannot take the stack."""
    if not _panels.keep(stack):
        return False
    packed = _panels.get(stack)
    for expert, view in enumerate(views):
        _panels.keep(view, packed[expert])
    return True


def unpack(weight: torch.Tensor) -> None:
    """Release the panel-packed copy of weight, if any."""
    _panels.release(weight)


def panel(weight: torch.Tensor) -> torch.Tensor | None:
    """The panel-packed copy of this weight tensor (remade first if the weight changed), or None."""
    return _panels.get(weight)


def panel_count() -> int:
    """How many weights hold a panel-packed copy (an expert view counts, though it shares its stack's)."""
    return _panels.count()


def panel_bytes() -> int:
    """Bytes of the panel-packed copies (their extra memory): the stacks' copies, not their slices again."""
    return _panels.nbytes()
