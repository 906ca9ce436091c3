"""Linear layer whose weight is either float or FP8 e4m3 with DeepSeek 128x128 block scales.

Float mode is `F.linear`, run on CPU by whichever kernel this host measured fastest for the shape and
row count: our C panel kernel from a panel-packed fp32 weight (`layers.panel_packs`), our C decode kernel
(`kernels.cpu_decode`), oneDNN with a packed weight (`layers.packed_gemm`) or torch's own, in the product
form `layers.cpu_gemm` chose. FP8 mode keeps a checkpoint's e4m3 weight [out, in] and its
`weight_scale_inv` [ceil(out/128), ceil(in/128)] (the real weight is each 128x128 block times its
scale) and runs `kernels.gemm.fp8_linear`, which quantizes activations per token per 128 channels.
This module does not quantize weights (`kernels.quant` does) and does not read checkpoints
(`model_worker.weights` does, and switches layers to FP8 with `to_fp8`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_decode import decode_gemm, decode_gemm_available, panel_gemm
from model_worker.layers import panel_packs
from model_worker.layers.cpu_gemm import choice_wins, cpu_gemm_preferences, row_bucket, wide_product, wide_wins
from model_worker.layers.packed_gemm import packed, packed_linear, packed_linear_add

WEIGHT_BLOCK = 128  # DeepSeek FP8 weight scale block, in both dimensions
FP8_WEIGHT_DTYPE = torch.float8_e4m3fn
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


def weight_scale_shape(out_features: int, in_features: int, block: int = WEIGHT_BLOCK) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for a [out_features, in_features] block-quantized weight."""
    return (-(-out_features // block), -(-in_features // block))


_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _one_half_precision_row_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1] and weight.dtype in _HALF_DTYPES and x.dtype == weight.dtype and not x.is_cuda


WIDE_PRODUCT_MAX_ROWS = 512  # beyond this (prefill) torch's default form is as fast


def _wide_product_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """Rows of x if `linear` should run it as (W @ x^T)^T on this host (`layers.cpu_gemm`), else 0."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.is_cuda or weight.dim() != 2:
        return 0
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < 2 or rows > WIDE_PRODUCT_MAX_ROWS:
        return 0
    prefs = cpu_gemm_preferences()
    input_major = weight.stride(0) == 1 and weight.shape[0] > 1
    least = prefs.wide_min_rows_input_major if input_major else prefs.wide_min_rows_output_major
    if least is None or rows < least:
        return 0
    if input_major and prefs.tune_input_major_wide and not wide_wins(x, weight, rows):
        return 0
    return rows


def _packed_weight_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """weight's oneDNN-packed copy if `linear` should run x through it here (`layers.packed_gemm`), else None:
    the weight is packed, x has its dtype, no gradient is wanted, and on this host the packed kernel won for
    this weight shape, dtype and row count (`layers.cpu_gemm`)."""
    packed_weight = packed(weight)
    if packed_weight is None or x.dtype != weight.dtype or (weight.requires_grad and torch.is_grad_enabled()):
        return None
    prefs = cpu_gemm_preferences()
    if not prefs.pack_weights:
        return None
    if prefs.tune_packed:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        key = ("packed", *weight.shape, weight.dtype, row_bucket(max(rows, 1)))
        if not choice_wins(key, lambda: (lambda: unpacked_linear(x, weight, bias),
                                          lambda: packed_linear(x, packed_weight, bias))):
            return None
    return packed_weight


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def native_kernel_takes(x: torch.Tensor, rows: int, weight: torch.Tensor) -> bool:
    """Whether the C decode kernels (`kernels.cpu_decode`) may run `rows` rows of x against weight
    ([out, in], or a stack [G, out, in]) here: CPU operands, both fp32 or both bf16, output-major weights
    (unit stride along in), no gradient wanted, 1 to `native_max_rows` rows (`layers.cpu_gemm`), and the
    kernels built here."""
    if x.dtype != weight.dtype or weight.dtype not in _NATIVE_DTYPES or weight.stride(-1) != 1:
        return False
    if not 0 < rows <= cpu_gemm_preferences().native_max_rows or x.is_cuda or weight.is_cuda:
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
        return False
    return decode_gemm_available()


def _native_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Rows of x if `linear` should run it through the C decode kernel, else 0: the kernel takes the operands
    (`native_kernel_takes`) and on this host it won for this weight shape, dtype and row count
    (`layers.cpu_gemm`). One fp32 row is not timed per shape: the host measurement enabled the kernel on
    exactly that, with weights read from memory as in decode, while `choice_wins` repeats the same operands,
    which then come from the caches and favour other kernels (in a throwaway A/B at batch 1, timing it per
    shape made decode slower)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if weight.dim() != 2 or not native_kernel_takes(x, rows, weight):
        return 0
    if cpu_gemm_preferences().tune_native and (rows > 1 or weight.dtype != torch.float32):
        key = ("native", *weight.shape, weight.dtype, row_bucket(rows))
        if not choice_wins(key, lambda: (lambda: _library_linear(x, weight, bias),
                                         lambda: _native_linear(x, weight, bias))):
            return 0
    return rows


def _native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear through the C decode kernel. x [..., in] and weight [out, in] (output-major), both fp32 or
    both bf16 -> [..., out]."""
    return decode_gemm(_rows_2d(x), weight, bias).view(*x.shape[:-1], weight.shape[0])


def panel_for(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """weight's panel-packed copy if `linear` should run x through our C panel kernel: the weight has one
    (`layers.panel_packs`, kept where this host measured the kernel faster), x is fp32 on the CPU and no
    gradient is wanted."""
    panel = panel_packs.panel(weight)
    if panel is None or x.dtype != torch.float32 or x.is_cuda or not cpu_gemm_preferences().panel_weights:
        return None
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
        return None
    return panel


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] as [rows, in] with unit stride along in (a view where it can be)."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, on CPU through our C panel kernel for fp32 weights packed for it (`panel_for`), else the C
    decode kernel for a few fp32 or bf16 rows where it wins here (`_native_rows`), else `_library_linear`.
    x [..., in]; weight [out, in] -> [..., out]."""
    panel = panel_for(x, weight)
    if panel is not None:
        return panel_gemm(_rows_2d(x), panel, weight.shape[0], bias).view(*x.shape[:-1], weight.shape[0])
    if _native_rows(x, weight, bias):
        return _native_linear(x, weight, bias)
    return _library_linear(x, weight, bias)


def _library_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through torch's kernels: the weight's oneDNN-packed copy when it has one and that wins here
    (`layers.packed_gemm`), else `unpacked_linear`."""
    packed_weight = _packed_weight_for(x, weight, bias)
    if packed_weight is not None:
        return packed_linear(x, packed_weight, bias)
    return unpacked_linear(x, weight, bias)


def unpacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with two CPU fast paths for decode-sized batches (same function, other kernel calls):

    - one bf16/fp16 row runs as a matrix-vector product: torch's GEMV reads 16-bit weights faster than
      its one-row GEMM (decode of a half-precision model at batch 1);
    - 2..512 fp32 rows (16..512 for an input-major weight, `layers.layout`) run as (W @ x^T)^T, the
      product with the weight as the tall left operand, on hosts where torch's CPU GEMM runs that faster
      than x @ W^T (`layers.cpu_gemm`; 1.15-3.5x on AMD EPYC, benchmarks/weight_layout.py). The result
      is then a transposed view.
    x [..., in]; weight [out, in] -> [..., out]."""
    rows = _wide_product_rows(x, weight)
    if rows:
        x2d = x.reshape(rows, x.shape[-1])
        out = wide_product(x2d, weight) if bias is None else torch.addmm(bias[:, None], weight, x2d.t())  # [out, rows]
        return out.t().view(*x.shape[:-1], weight.shape[0])
    if not _one_half_precision_row_on_cpu(x, weight):
        return F.linear(x, weight, bias)
    row = x.reshape(-1)
    out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_accumulate(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, alpha: float,
                      weight_t: torch.Tensor | None = None) -> torch.Tensor:
    """out + alpha * linear(x, weight) in one call: out [M, out_features], x [M, in] -> [M, out_features].
    weight_t: weight.t() if the caller keeps it (saves a dispatch per call)."""
    panel = panel_for(x, weight) if out.dtype == x.dtype and x.dim() == 2 else None
    if panel is not None:
        return panel_gemm(_rows_2d(x), panel, weight.shape[0], out, alpha)
    if out.dtype == x.dtype and x.dim() == 2 and _native_rows(x, weight, None):
        return decode_gemm(_rows_2d(x), weight, out, alpha)
    packed_weight = _packed_weight_for(x, weight, None)
    if packed_weight is not None and out.dtype == x.dtype:
        return packed_linear_add(out, x if alpha == 1 else x * alpha, packed_weight)
    if _one_half_precision_row_on_cpu(x, weight) and out.dtype == x.dtype:
        return torch.addmv(out.reshape(-1), weight, x.reshape(-1), alpha=alpha).view_as(out)
    return torch.addmm(out, x, weight.t() if weight_t is None else weight_t, alpha=alpha)


def is_plain_float(dtype: torch.dtype) -> bool:
    """True for float dtypes that support arithmetic (fp16/bf16/fp32/fp64), not fp8 or e8m0."""
    return dtype.is_floating_point and dtype not in _FP8_DTYPES and dtype != torch.float8_e8m0fnu


class Linear(nn.Module):
    """Bias-free-by-default linear whose weight is either float, or FP8 e4m3 with DeepSeek block scales.

    weight: [out_features, in_features] (float, or e4m3 in FP8 mode);
    weight_scale_inv: None in float mode, fp32 [ceil(out/128), ceil(in/128)] in FP8 mode;
    bias: [out_features] float or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and is_plain_float(dtype)):
            raise TypeError(f"dtype must be a float dtype such as torch.bfloat16 (not fp8), got {dtype!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        # Registered (as None) so that FP8 mode can set it and it then appears in state_dict().
        self.register_parameter("weight_scale_inv", None)
        self.activation_scale_fmt = "fp32"  # FP8 mode: how activations' per-block scales are stored
        self.reset_parameters()

    @property
    def is_fp8(self) -> bool:
        """Whether the weight is stored as e4m3 with block scales."""
        return self.weight_scale_inv is not None

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (checkpoints overwrite it; tests use it for random layers)."""
        if self.is_fp8:
            raise RuntimeError("reset_parameters is for float mode; this layer holds FP8 weights")
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def to_fp8(self, weight_q: torch.Tensor, scale_inv: torch.Tensor, activation_scale_fmt: str = "fp32") -> None:
        """Switch to FP8 storage: weight_q e4m3 [out, in], scale_inv [ceil(out/128), ceil(in/128)].

        The scales are stored as fp32 on weight_q's device; the bias is left as it is. activation_scale_fmt:
        "fp32" or "ue8m0" (activation scales rounded up to powers of two, as the checkpoint was trained).
        """
        from kernels.quant.fp8_format import check_scale_fmt

        check_scale_fmt(activation_scale_fmt)
        self._check_weight("weight_q", weight_q)
        if weight_q.dtype != FP8_WEIGHT_DTYPE:
            raise TypeError(f"weight_q must be {FP8_WEIGHT_DTYPE}, got {weight_q.dtype}")
        if not isinstance(scale_inv, torch.Tensor):
            raise TypeError(f"scale_inv must be a torch.Tensor, got {type(scale_inv).__name__}")
        if not scale_inv.dtype.is_floating_point:
            raise TypeError(f"scale_inv must be a float tensor, got {scale_inv.dtype}")
        expected = weight_scale_shape(self.out_features, self.in_features)
        if tuple(scale_inv.shape) != expected:
            raise ValueError(f"scale_inv must have shape {list(expected)}, got {list(scale_inv.shape)}")
        scale_inv = scale_inv.to(device=weight_q.device, dtype=torch.float32)
        self.weight = nn.Parameter(weight_q, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(scale_inv, requires_grad=False)
        self.activation_scale_fmt = activation_scale_fmt

    def to_float(self, weight: torch.Tensor) -> None:
        """Switch to (or stay in) float storage with this weight [out, in]."""
        self._check_weight("weight", weight)
        if not is_plain_float(weight.dtype):
            raise TypeError(f"weight must be a float tensor (not fp8), got {weight.dtype}")
        self.weight = nn.Parameter(weight)
        self.weight_scale_inv = None

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The real weight [out, in]: the float weight, or FP8 dequantized (fp32 unless dtype is given)."""
        if not self.is_fp8:
            return self.weight if dtype is None else self.weight.to(dtype)
        from kernels.quant import dequantize_fp8_weight

        return dequantize_fp8_weight(
            self.weight, self.weight_scale_inv, block=WEIGHT_BLOCK, dtype=dtype or torch.float32
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x.dtype (FP8 mode) or the weight dtype."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must have last dimension {self.in_features}, got shape {list(x.shape)}")
        if not self.is_fp8:
            return linear(x, self.weight, self.bias)
        from kernels.gemm import fp8_linear

        return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, scale_fmt=self.activation_scale_fmt)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Linear:
        """Move FP8 storage along with the module but never cast it.

        `model.to(torch.bfloat16)` / `.half()` would otherwise turn e4m3 weights into plain floats
        without their scales (and round the fp32 scales); in FP8 mode only the device follows `fn`.
        """
        if not self.is_fp8:
            return super()._apply(fn, recurse)
        order = list(self._parameters)
        fp8 = {name: self._parameters.pop(name) for name in ("weight", "weight_scale_inv")}
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters.update(fp8)
        for name, param in fp8.items():
            moved = fn(param.detach())
            if moved.dtype != param.dtype:
                moved = param.detach().to(device=moved.device)
            self._parameters[name] = nn.Parameter(moved, requires_grad=False)
        reordered = [(name, self._parameters[name]) for name in order]
        self._parameters.clear()
        self._parameters.update(reordered)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fp8={self.is_fp8}"
        )

    def _check_weight(self, arg: str, weight: torch.Tensor) -> None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{arg} must have shape [{self.out_features}, {self.in_features}], got {list(weight.shape)}"
            )
