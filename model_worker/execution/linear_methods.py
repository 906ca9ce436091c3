"""Linear methods: how one weight is prepared once and applied on every call.

Each `Linear`, each fusion of Linears (`execution.fused`) and the LM head holds one method, chosen when the
model is loaded (`execution.prepare.arrange_weights`, by `execution.policy`'s fixed rule). The model calls
`layer.method.apply(layer, x)` and never names a kernel; the method owns the weight's prepared copy (if any)
and the kernel.

- REFERENCE: torch's `F.linear`. A model that was built but never arranged (training, tests) runs it.
- PANEL: fp32 on CPU through our C panel kernel, from a panel-packed copy made at load (`panel_packs`).
- C_ROWS: bf16 on CPU, up to `policy.C_ROWS_MAX_ROWS` rows through our C dot-product kernel, more through torch.
- FP8_BLOCK: e4m3 weights with DeepSeek 128x128 block scales (`engram_kernels.gemm.fp8_linear`).

A method whose kernel cannot take a call (a gradient is wanted, or the weight was cast or moved after
loading and not arranged again) runs torch's kernel instead: never wrong, only slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engram_kernels.cpu_decode import decode_gemm, decode_gemm_available, panel_gemm
from model_worker.execution import panel_packs
from model_worker.execution.policy import C_ROWS_MAX_ROWS, our_cpu_kernels


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] as [rows, in] with unit stride along in (a view where it can be)."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _wants_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)


class LinearMethod:
    """torch's kernels (the reference every other method is tested against)."""

    name = "torch"

    def prepare(self, weight: torch.Tensor) -> None:
        """Make what `run` needs of weight [out, in] (or an expert stack [E, out, in]), once, at load."""

    def release(self, weight: torch.Tensor) -> None:
        """Drop what `prepare` made for weight."""

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        """layer (with .weight [out, in] and .bias) applied to x [..., in] -> [..., out]."""
        return self.run(x, layer.weight, layer.bias)

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(x, weight, bias): x [..., in], weight [out, in] -> [..., out]."""
        return F.linear(x, weight, bias)

    def accumulate(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
        """out + alpha * x @ weight^T in one call: out [M, out_features], x [M, in] -> [M, out_features]."""
        return torch.addmm(out, x, weight.t(), alpha=alpha)

    def __repr__(self) -> str:
        return f"<linear method {self.name}>"


class PanelLinear(LinearMethod):
    """fp32 on CPU through our C panel kernel (`engram_kernels.cpu_decode.panel_gemm`), any number of rows."""

    name = "c-panel"

    def prepare(self, weight: torch.Tensor) -> None:
        panel_packs.pack(weight)

    def release(self, weight: torch.Tensor) -> None:
        panel_packs.unpack(weight)

    @staticmethod
    def panel_for(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """weight's panel-packed copy if the kernel takes this call (fp32 x on CPU, no gradient), else None."""
        if x.dtype != torch.float32 or x.is_cuda or _wants_grad(x, weight):
            return None
        return panel_packs.panel(weight)

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        panel = self.panel_for(x, weight)
        if panel is None:
            return F.linear(x, weight, bias)
        return panel_gemm(_rows_2d(x), panel, weight.shape[0], bias).view(*x.shape[:-1], weight.shape[0])

    def accumulate(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
        panel = self.panel_for(x, weight) if out.dtype == x.dtype else None
        if panel is None:
            return super().accumulate(out, x, weight, alpha)
        return panel_gemm(_rows_2d(x), panel, weight.shape[0], out, alpha)


class CRowsLinear(LinearMethod):
    """A few rows on CPU through our C dot-product kernel (`engram_kernels.cpu_decode.decode_gemm`), which
    streams output-major weight rows; torch's kernel for more rows."""

    name = "c-rows"

    @staticmethod
    def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether the kernel takes this call: CPU operands of one dtype (bf16 or fp32), weight [out, in] or
        [G, out, in] with unit stride along in, 1 to C_ROWS_MAX_ROWS rows, no gradient, the kernel built."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return (0 < rows <= C_ROWS_MAX_ROWS and x.dtype == weight.dtype
                and weight.dtype in (torch.float32, torch.bfloat16) and weight.stride(-1) == 1
                and not x.is_cuda and not weight.is_cuda and not _wants_grad(x, weight) and decode_gemm_available())

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.takes(x, weight):
            return F.linear(x, weight, bias)
        return decode_gemm(_rows_2d(x), weight, bias).view(*x.shape[:-1], weight.shape[0])

    def accumulate(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
        if out.dtype != x.dtype or not self.takes(x, weight):
            return super().accumulate(out, x, weight, alpha)
        return decode_gemm(_rows_2d(x), weight, out, alpha)


class Fp8BlockLinear(LinearMethod):
    """e4m3 weights with 128x128 block scales (`layers.linear.Linear.to_fp8`): activations quantized per token
    per 128 channels with the checkpoint's scale format, then `engram_kernels.gemm.fp8_linear` (Triton on GPU)."""

    name = "fp8-block"

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        from engram_kernels.gemm import fp8_linear

        return fp8_linear(x, layer.weight, layer.weight_scale_inv, layer.bias, scale_fmt=layer.activation_scale_fmt)

    def run(self, x, weight, bias=None):
        raise TypeError("FP8 weights need their block scales: call apply(layer, x)")

    def accumulate(self, out, x, weight, alpha):
        raise TypeError("FP8 weights need their block scales: call apply(layer, x)")


REFERENCE = LinearMethod()
PANEL = PanelLinear()
C_ROWS = CRowsLinear()
FP8_BLOCK = Fp8BlockLinear()


def method_for(weight: torch.Tensor) -> LinearMethod:
    """The method a float weight [out, in] (or expert stack) runs by on this host (`execution.policy`):
    PANEL for fp32 on CPU and C_ROWS for bf16 on CPU where our C kernels run, else REFERENCE."""
    if weight.device.type != "cpu" or weight.is_meta or not our_cpu_kernels():
        return REFERENCE
    if weight.dtype == torch.float32 and panel_packs.packable(weight):
        return PANEL
    if weight.dtype == torch.bfloat16 and weight.stride(-1) == 1:
        return C_ROWS
    return REFERENCE
