"""Linear layer whose weight is either float or FP8 e4m3 with DeepSeek 128x128 block scales.

The layer runs by its method (`self.method`, `model_worker.execution.linear_methods`): torch's F.linear until
the loader chooses this host's method (`CausalLM.arrange_weights`); FP8 mode's method is FP8_BLOCK. FP8 mode
keeps a checkpoint's e4m3 weight [out, in] and its
`weight_scale_inv` [ceil(out/128), ceil(in/128)] (the real weight is each 128x128 block times its
scale) and runs `engram_kernels.gemm.fp8_linear`, which quantizes activations per token per 128 channels.
This module does not quantize weights (`engram_kernels.quant` does) and does not read checkpoints
(`model_worker.weights` does, and switches layers to FP8 with `to_fp8`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from model_worker.execution.linear_methods import FP8_BLOCK, REFERENCE, LinearMethod

WEIGHT_BLOCK = 128  # DeepSeek FP8 weight scale block, in both dimensions
FP8_WEIGHT_DTYPE = torch.float8_e4m3fn
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


def weight_scale_shape(out_features: int, in_features: int, block: int = WEIGHT_BLOCK) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for a [out_features, in_features] block-quantized weight."""
    return (-(-out_features // block), -(-in_features // block))


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
        self.method: LinearMethod = REFERENCE  # how forward runs; chosen at load (`CausalLM.arrange_weights`)
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
        from engram_kernels.quant.fp8_format import check_scale_fmt

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
        self.method = FP8_BLOCK

    def to_float(self, weight: torch.Tensor) -> None:
        """Switch to (or stay in) float storage with this weight [out, in]."""
        self._check_weight("weight", weight)
        if not is_plain_float(weight.dtype):
            raise TypeError(f"weight must be a float tensor (not fp8), got {weight.dtype}")
        self.weight = nn.Parameter(weight)
        self.weight_scale_inv = None
        self.method = REFERENCE  # until the model is arranged again

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The real weight [out, in]: the float weight, or FP8 dequantized (fp32 unless dtype is given)."""
        if not self.is_fp8:
            return self.weight if dtype is None else self.weight.to(dtype)
        from engram_kernels.quant import dequantize_fp8_weight

        return dequantize_fp8_weight(
            self.weight, self.weight_scale_inv, block=WEIGHT_BLOCK, dtype=dtype or torch.float32
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x.dtype (FP8 mode) or the weight dtype."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must have last dimension {self.in_features}, got shape {list(x.shape)}")
        return self.method.apply(self, x)

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
