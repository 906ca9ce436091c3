"""Engram rows on the wire in the table's own format: FP8 rows with their scales, not dequantized floats.

A served FP8 table row of D values is D e4m3 bytes plus D/32 e8m0 scale bytes (66 B for D = 64) where the
dequantized fp32 row is 4·D bytes (256 B): 3.9x less to send. `encode_rows` gathers rows as their raw bytes, each
row's values followed by its scales, in one numpy uint8 array: torch's float8 tensors do not survive Ray's
serializer (docs/capacity.md §7), and Ray ships numpy arrays as raw buffers where a torch tensor goes through
pickle (a step's rows: 1.1-1.4 ms per actor call as numpy against 2.7-3.3 ms as torch tensors, on this 2-core
host). `decode_rows` dequantizes on the receiving side with the gather's own formula (`engram_gather_ref`'s
operations, on rows already gathered), so the rows are bit for bit the ones the sender would have dequantized (an
e4m3 value times a power of two is exact in fp32). bf16/fp16/fp32 tables travel in their dtype the same way,
without scales. `ids_array` / `ids_tensor` carry the hash ids the same way (int64 numpy arrays).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engram_kernels.engram.gather import SCALE_BLOCK, check_gather_args
from engram_kernels.quant.fp8_format import one_byte_float_to_float32

WIRE_DTYPES = {str(dtype).removeprefix("torch."): dtype
               for dtype in (torch.float8_e4m3fn, torch.bfloat16, torch.float16, torch.float32)}


def encode_rows(data: torch.Tensor, scales: torch.Tensor | None, local_ids: torch.Tensor) -> dict[str, Any]:
    """Rows `local_ids` [n] of a table data [R, D] (+ scales [R, D/32]) as bytes ->
    {"dtype": name, "rows": numpy uint8 [n, D * itemsize (+ D/32 scale bytes)]}."""
    check_gather_args(data, scales, local_ids, torch.float32)
    ids = local_ids.to(data.device)
    parts = [data[ids].view(torch.uint8)]  # [n, D * itemsize]
    if scales is not None:
        parts.append(scales[ids].view(torch.uint8))  # [n, D / 32]
    rows = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous()
    return {"dtype": str(data.dtype).removeprefix("torch."), "rows": rows.cpu().numpy()}


def decode_rows(encoded: Any) -> torch.Tensor:
    """`encode_rows`' output -> rows fp32 [n, D]; ValueError for anything that is not well-formed."""
    if not isinstance(encoded, dict) or set(encoded) != {"dtype", "rows"}:
        raise ValueError(f"encoded rows: expected a dict with dtype and rows, got {_describe(encoded)}")
    dtype, raw = WIRE_DTYPES.get(encoded["dtype"]), encoded["rows"]
    if dtype is None:
        raise ValueError(f"encoded rows: unknown dtype {encoded['dtype']!r} (want one of {sorted(WIRE_DTYPES)})")
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"encoded rows: rows must be a numpy uint8 [n, bytes] array, got {_describe(raw)}")
    width = raw.shape[1]  # D * itemsize, plus D / 32 scale bytes for fp8
    per_value = dtype.itemsize + (1 / SCALE_BLOCK if dtype == torch.float8_e4m3fn else 0)
    values = round(width / per_value)
    if values * per_value != width or (dtype == torch.float8_e4m3fn and values % SCALE_BLOCK):
        raise ValueError(f"encoded rows: {width} bytes per row is not a whole row of {dtype} values"
                         + (" and their scales" if dtype == torch.float8_e4m3fn else ""))
    table = torch.from_numpy(raw.copy())  # a writable copy: Ray hands arrays over read-only
    if dtype != torch.float8_e4m3fn:
        return table.view(dtype).float()  # [n, D]
    # engram_gather_ref's dequantization, on rows already gathered: e4m3 value * e8m0 scale per 32 values
    rows = one_byte_float_to_float32(table[:, :values].view(dtype))  # [n, D]
    per_block = one_byte_float_to_float32(table[:, values:].view(torch.float8_e8m0fnu))  # [n, D / 32]
    return (rows.unflatten(-1, (-1, SCALE_BLOCK)) * per_block[..., None]).flatten(-2)


def encoded_nbytes(encoded: dict[str, Any]) -> int:
    """Bytes of row data (with scales) in one `encode_rows` output."""
    return int(encoded["rows"].nbytes)


def ids_array(ids: torch.Tensor) -> np.ndarray:
    """Hash ids int64 [n] as the numpy array a transport carries."""
    return ids.detach().to(device="cpu", dtype=torch.int64).numpy()


def ids_tensor(ids: Any) -> Any:
    """A numpy array of ids back to a tensor (copied: writable); anything else as it is, for the checks."""
    return torch.from_numpy(ids.copy()) if isinstance(ids, np.ndarray) else ids


def _describe(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__} {value.dtype} {list(value.shape)}"
    return type(value).__name__
