"""Engram tables held in this process: one [rows, head_dim] table per Engram layer.

FP8 tables store float8_e4m3fn values with one power-of-two float8_e8m0fnu scale per 32 values
(scale = 2 ** ceil(log2(max(amax, 1e-4) / 448))); bf16/fp32 tables store values directly.
`InProcessEngramTables` is the in-process `EngramTableClient` (`lookup(layer, hash_ids) -> rows`).
Loading tables from files, sharding, caching and serving them remotely belong to `memory_service`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from engram_kernels.engram import engram_gather
from engram_kernels.engram.gather import SCALE_BLOCK

E4M3_MAX = 448.0
E8M0_BIAS = 127
MIN_BLOCK_AMAX = 1e-4
TABLE_FORMATS = {"fp8": torch.float8_e4m3fn, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quantize_e4m3_blocks(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled FP8.  weights [R, D] -> (e4m3 [R, D], e8m0 scales [R, D // 32])"""
    if weights.dim() != 2 or weights.shape[1] % SCALE_BLOCK:
        raise ValueError(f"weights: expected [R, D] with D % {SCALE_BLOCK} == 0, got {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"weights: expected a floating tensor, got {weights.dtype}")
    rows, dim = weights.shape
    blocks = weights.float().reshape(rows, dim // SCALE_BLOCK, SCALE_BLOCK)  # [R, D/32, 32]
    if not torch.isfinite(blocks).all():
        raise ValueError("weights: must be finite to quantize")
    ratio = blocks.abs().amax(dim=-1).clamp(min=MIN_BLOCK_AMAX) / E4M3_MAX  # [R, D/32]
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # exact ceil(log2(ratio))
    scale = torch.ldexp(torch.ones_like(ratio), exponent)
    values = (blocks / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    scales = (exponent + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)
    return values.reshape(rows, dim), scales


class EngramTable:
    """One layer's table: data [R, head_dim] (e4m3 with scales [R, head_dim // 32], or bf16/fp32)."""

    def __init__(self, data: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        if not isinstance(data, torch.Tensor) or data.dim() != 2:
            raise ValueError(f"data: expected a [rows, head_dim] tensor, got {getattr(data, 'shape', data)}")
        if data.dtype not in TABLE_FORMATS.values():
            raise TypeError(f"data: expected one of {list(TABLE_FORMATS.values())}, got {data.dtype}")
        fp8 = data.dtype == torch.float8_e4m3fn
        if fp8 and (scales is None or scales.dtype != torch.float8_e8m0fnu
                    or tuple(scales.shape) != (data.shape[0], data.shape[1] // SCALE_BLOCK)):
            raise ValueError(
                f"scales: an fp8 table needs float8_e8m0fnu scales of shape "
                f"{(data.shape[0], data.shape[1] // SCALE_BLOCK)}, got {getattr(scales, 'shape', None)}"
            )
        if not fp8 and scales is not None:
            raise ValueError(f"scales: must be None for a {data.dtype} table")
        self.data = data
        self.scales = scales

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def head_dim(self) -> int:
        return self.data.shape[1]

    @property
    def fmt(self) -> str:
        return next(name for name, dtype in TABLE_FORMATS.items() if dtype == self.data.dtype)

    @classmethod
    def from_float(cls, weights: torch.Tensor, fmt: str = "fp8") -> EngramTable:
        """Store float weights [R, head_dim] as `fmt` ("fp8", "bfloat16" or "float32")."""
        if fmt not in TABLE_FORMATS:
            raise ValueError(f"fmt: expected one of {list(TABLE_FORMATS)}, got {fmt!r}")
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise TypeError(f"weights: expected a floating tensor, got {getattr(weights, 'dtype', weights)}")
        if fmt == "fp8":
            return cls(*quantize_e4m3_blocks(weights))
        if weights.dim() != 2:
            raise ValueError(f"weights: expected [R, head_dim], got {tuple(weights.shape)}")
        return cls(weights.to(TABLE_FORMATS[fmt]).contiguous())

    @classmethod
    def random(
        cls, rows: int, head_dim: int, dtype: str = "fp8", seed: int = 0, std: float = 1.0
    ) -> EngramTable:
        """A table of N(0, std^2) rows, deterministic in `seed` (for tests and demos)."""
        if rows < 1 or head_dim < 1:
            raise ValueError(f"rows, head_dim: must be >= 1, got {rows}, {head_dim}")
        generator = torch.Generator().manual_seed(seed)
        weights = torch.randn(rows, head_dim, generator=generator) * std
        return cls.from_float(weights, dtype)

    def to(self, device: torch.device | str) -> EngramTable:
        scales = None if self.scales is None else self.scales.to(device)
        return EngramTable(self.data.to(device), scales)

    def dequantize(self) -> torch.Tensor:
        """All rows as fp32.  -> [R, head_dim]"""
        return self.lookup(torch.arange(self.rows, device=self.data.device))

    def lookup(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """Gather and dequantize rows.  hash_ids int64 [...] -> fp32 [..., head_dim]"""
        return engram_gather(self.data, self.scales, hash_ids)


_TENSOR_NAME = re.compile(r"engram\.(\d+)\.(table|scales)")


class InProcessEngramTables:
    """EngramTableClient over tables kept in this process, keyed by Engram layer id."""

    def __init__(self, tables: dict[int, EngramTable]) -> None:
        for layer, table in tables.items():
            if not isinstance(table, EngramTable):
                raise TypeError(f"tables[{layer}]: expected EngramTable, got {type(table).__name__}")
        self.tables = dict(tables)

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.tables)

    def lookup(self, layer_id: int, hash_ids: torch.Tensor) -> torch.Tensor:
        """Rows of one layer's table.  hash_ids int64 [...] -> fp32 [..., head_dim]"""
        if layer_id not in self.tables:
            raise ValueError(f"layer_id: no Engram table for layer {layer_id} (have {self.layer_ids})")
        return self.tables[layer_id].lookup(hash_ids)

    def state_dict_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs: engram.{layer}.table and, for fp8 tables, engram.{layer}.scales."""
        for layer in self.layer_ids:
            table = self.tables[layer]
            yield f"engram.{layer}.table", table.data
            if table.scales is not None:
                yield f"engram.{layer}.scales", table.scales

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> InProcessEngramTables:
        """Inverse of `state_dict_items`."""
        parts: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            match = _TENSOR_NAME.fullmatch(name)
            if match is None:
                raise ValueError(f"tensors: unexpected name {name!r} (want engram.<layer>.table|scales)")
            parts.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        tables = {}
        for layer, part in parts.items():
            if "table" not in part:
                raise ValueError(f"tensors: engram.{layer}.scales without engram.{layer}.table")
            tables[layer] = EngramTable(part["table"], part.get("scales"))
        return cls(tables)
