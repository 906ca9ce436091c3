"""Write one FP8 Engram table as a safetensors file chunk by chunk, so a table larger than memory can be
built without ever holding it.

The file is what `table_file.MappedTableFile` maps and `EngramTableStore` serves: `engram.{layer}.table`
(F8_E4M3 [rows, head_dim]) followed by `engram.{layer}.scales` (F8_E8M0 [rows, head_dim / 32]), behind the
safetensors header (8-byte little-endian length, JSON padded with spaces to 8 bytes). With `checksum=True`
(the default) the header's metadata records the SHA-256 of the data region (`engram.sha256`), computed as the
chunks go by and written into the header at the end; `MappedTableFile.verify()` and
`python -m memory_service.verify` check it. Tables that fit in memory are written by `model_worker.save_model`
with the safetensors library instead.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from engram_kernels.engram.gather import SCALE_BLOCK
from memory_service.table_file import CHECKSUM_KEY

_PLACEHOLDER = "0" * 64  # a hex SHA-256 is 64 characters: the real one overwrites it in place


def write_fp8_table_streamed(path: str | Path, layer_id: int, rows: int, head_dim: int,
                             data_chunks: Iterable[np.ndarray], scale_chunks: Iterable[np.ndarray], *,
                             checksum: bool = True) -> None:
    """data_chunks: uint8 e4m3 codes [n_i, head_dim], in row order, summing to `rows`; scale_chunks: uint8
    e8m0 codes [n_i, head_dim / 32], likewise. All data chunks are consumed before the first scale chunk.
    ValueError (and no file left behind) if the chunks do not add up to the declared shapes."""
    if rows < 1 or head_dim < 1 or head_dim % SCALE_BLOCK:
        raise ValueError(f"rows must be >= 1 and head_dim a positive multiple of {SCALE_BLOCK}, got {rows}, "
                         f"{head_dim}")
    path = Path(path)
    data_bytes, scale_bytes = rows * head_dim, rows * head_dim // SCALE_BLOCK
    header = {f"engram.{layer_id}.table": {"dtype": "F8_E4M3", "shape": [rows, head_dim],
                                           "data_offsets": [0, data_bytes]},
              f"engram.{layer_id}.scales": {"dtype": "F8_E8M0", "shape": [rows, head_dim // SCALE_BLOCK],
                                            "data_offsets": [data_bytes, data_bytes + scale_bytes]}}
    if checksum:
        header["__metadata__"] = {CHECKSUM_KEY: _PLACEHOLDER}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256() if checksum else None
    try:
        with open(path, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            _write_rows(handle, data_chunks, head_dim, data_bytes, "data_chunks", digest)
            _write_rows(handle, scale_chunks, head_dim // SCALE_BLOCK, scale_bytes, "scale_chunks", digest)
            if digest is not None:
                handle.seek(0)
                handle.write(struct.pack("<Q", len(text)) + text.replace(_PLACEHOLDER.encode(),
                                                                          digest.hexdigest().encode(), 1))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _write_rows(handle, chunks: Iterable[np.ndarray], width: int, total: int, name: str, digest) -> None:
    written = 0
    for chunk in chunks:
        if chunk.dtype != np.uint8 or chunk.ndim != 2 or chunk.shape[1] != width:
            raise ValueError(f"{name}: expected uint8 [n, {width}] chunks, got {chunk.dtype} {chunk.shape}")
        written += chunk.nbytes
        if written > total:
            raise ValueError(f"{name}: more than the declared {total // width} rows")
        raw = np.ascontiguousarray(chunk).tobytes()
        handle.write(raw)
        if digest is not None:
            digest.update(raw)
    if written != total:
        raise ValueError(f"{name}: {written // width} rows written, {total // width} declared")
