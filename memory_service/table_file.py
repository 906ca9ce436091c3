"""A safetensors file memory-mapped for serving: tensors are zero-copy views whose pages fault in on demand.

The header (8-byte little-endian length, then JSON: name -> dtype, shape, data_offsets) is parsed here,
not by the safetensors library, so that each tensor, or a row range of it, gets its own read-only shared
mapping (`mmap`, PROT_READ, MAP_SHARED): a table larger than RAM serves from the page cache, and a shard
maps only its rows. `release()` drops the mapped pages from this process's page tables
(madvise MADV_DONTNEED); they stay in the kernel's page cache and refault on the next touch.

The header is checked as strictly as the safetensors library checks it: every tensor lies inside the file
with the bytes its shape needs, and the tensors cover the data region exactly once (no overlap, no gap, no
trailing bytes), so a malformed file is refused at open with an error naming the file, never served.

A file truncated or replaced while it is mapped would kill the process with SIGBUS at the first read past
its new end: `check_unchanged()` compares the file's size and identity (device, inode; of the open file and
of the path) with what they were at open, and callers run it before reading mapped rows, so a lookup fails
with `TableFileChanged` instead. (A truncation landing between that check and the read can still fault:
the check narrows the window to one lookup, it cannot close it.)

Optional checksum: the metadata key `engram.sha256` holds the SHA-256 of the data region (every byte after
the header), written by `table_writer`; `verify()` (and `python -m memory_service.verify PATH`) recomputes it,
reading the file with pread (not the map), since flipped data bytes are otherwise undetectable.

Views are read-only memory presented as torch tensors: never write to them. Writing tables is not this
module's job (`model_worker.save_model` and `table_writer` write them).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
PAGE_BYTES = mmap.PAGESIZE
# The most one page fault maps: a PMD-sized window (2 MiB with 4 KiB pages). Large page-cache folios
# and fault-around never map pages outside the faulting address's PMD-aligned window.
FAULT_WINDOW_BYTES = PAGE_BYTES * (PAGE_BYTES // 8)
CHECKSUM_KEY = "engram.sha256"  # __metadata__ key: hex SHA-256 of the data region
VERIFY_CHUNK_BYTES = 8 * 2**20


class TableFileChanged(RuntimeError):
    """The table file was truncated, grown or replaced since it was opened: its mapped rows cannot be trusted."""


class TableFileCorrupt(ValueError):
    """The table file's data does not match the checksum in its header."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in the file: absolute byte range [begin, end)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


@dataclass
class MappedRegion:
    """One mapping and the view over it."""

    mapping: mmap.mmap
    view: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.view.numel() * self.view.element_size()


class MappedTableFile:
    """A safetensors file whose tensors are served as memory-mapped, zero-copy, read-only views."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such table file")
        self._file = open(self.path, "rb")  # kept open for the mappings' lifetime
        try:
            opened = os.fstat(self._file.fileno())
            self._identity = (opened.st_dev, opened.st_ino, opened.st_size)
            self.entries, self.metadata, self.data_start = _read_header(self._file, self.path)
        except BaseException:
            self._file.close()
            raise
        self._regions: list[MappedRegion] = []

    @property
    def size(self) -> int:
        """The file's size in bytes when it was opened."""
        return self._identity[2]

    def check_unchanged(self) -> None:
        """TableFileChanged if the open file's size, or the file the path names, differs from what was opened
        (truncated, grown, or replaced by another file): reading its mapped rows could fault or serve stale rows."""
        if self._file.closed:
            raise ValueError(f"{self.path}: file is closed")
        now = os.fstat(self._file.fileno())
        dev, ino, size = self._identity
        if now.st_size != size:
            raise TableFileChanged(f"{self.path}: table file changed while served: size {now.st_size} bytes, "
                                   f"{size} when opened (truncated or rewritten?); reopen it")
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            raise TableFileChanged(f"{self.path}: table file removed while served; reopen it") from None
        if (at_path.st_dev, at_path.st_ino) != (dev, ino):
            raise TableFileChanged(f"{self.path}: table file replaced by another file while served; reopen it")

    @property
    def checksum(self) -> str | None:
        """The data region's SHA-256 recorded in the header (hex), or None if the file has none."""
        return self.metadata.get(CHECKSUM_KEY)

    def verify(self) -> bool:
        """Recompute the data region's SHA-256 and compare it with the header's: True if they match, False if
        the file records no checksum; TableFileCorrupt (or TableFileChanged) otherwise."""
        want = self.checksum
        if want is None:
            return False
        self.check_unchanged()
        got = data_sha256(self._file.fileno(), self.data_start, self.size)
        if got != want:
            raise TableFileCorrupt(f"{self.path}: checksum mismatch: data region has sha256 {got}, header records "
                                   f"{want} (flipped or rewritten bytes)")
        return True

    def names(self) -> list[str]:
        return sorted(self.entries)

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor {name!r} (have {self.names()})")
        return self.entries[name]

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Map tensor `name` (or its rows [lo, hi)) and return a view.  -> [hi - lo, *shape[1:]]"""
        self.check_unchanged()
        entry = self.entry(name)
        lo, hi = (0, entry.rows) if rows is None else rows
        if not 0 <= lo <= hi <= entry.rows:
            raise ValueError(f"rows: ({lo}, {hi}) outside [0, {entry.rows}] for {name!r} in {self.path}")
        shape = (hi - lo, *entry.shape[1:]) if entry.shape else ()
        start, length = entry.begin + lo * entry.row_bytes, (hi - lo) * entry.row_bytes
        if length == 0:
            return torch.empty(shape, dtype=entry.dtype)
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(self._file.fileno(), start + length - aligned, access=mmap.ACCESS_READ,
                            offset=aligned)
        mapping.madvise(mmap.MADV_RANDOM)  # hashed rows: no readahead of neighbours
        with warnings.catch_warnings():  # torch warns that the buffer is read-only; it is, by design
            warnings.simplefilter("ignore", UserWarning)
            # numpy holds a buffer export on the mmap, so it cannot be unmapped while any view lives
            flat = torch.from_numpy(np.frombuffer(mapping, dtype=np.uint8, count=length, offset=start - aligned))
        view = flat.view(entry.dtype).view(shape)
        self._regions.append(MappedRegion(mapping, view))
        return view

    @property
    def mapped_bytes(self) -> int:
        return sum(region.nbytes for region in self._regions)

    def release(self) -> None:
        """Drop every mapped page from this process's page tables (they stay in the page cache)."""
        for region in self._regions:
            region.mapping.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Unmap what no view still uses (a live view keeps its mapping until it is freed); close the file."""
        mappings = [region.mapping for region in self._regions]
        self._regions = []  # drops our views
        for mapping in mappings:
            try:
                mapping.close()
            except BufferError:
                pass  # a caller still holds a view: the mapping goes when the last view does
        self._file.close()

    def __enter__(self) -> MappedTableFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def data_sha256(fd: int, begin: int, end: int) -> str:
    """Hex SHA-256 of bytes [begin, end) of an open file, read with pread in chunks."""
    digest = hashlib.sha256()
    offset = begin
    while offset < end:
        chunk = os.pread(fd, min(VERIFY_CHUNK_BYTES, end - offset), offset)
        if not chunk:
            raise TableFileChanged(f"file descriptor {fd}: ended at byte {offset}, expected {end} (truncated?)")
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _read_header(file, path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Parse and check the header; every tensor must lie inside the file with the bytes its shape needs, and
    the tensors must cover the data region exactly once.  -> (entries, metadata, data_start)"""
    size = os.fstat(file.fileno()).st_size
    prefix = file.read(8)
    if len(prefix) < 8:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise ValueError(f"{path}: header length {header_len} does not fit a {size}-byte file")
    try:
        header = json.loads(file.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: corrupt safetensors header (__metadata__ must map str to str)")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        entries[name] = _parse_entry(name, info, data_start, size, path)
    _check_coverage(entries, data_start, size, path)
    return entries, metadata, data_start


def _check_coverage(entries: dict[str, TensorEntry], data_start: int, size: int, path: Path) -> None:
    """The tensors, in offset order, must tile the data region [data_start, size): each begins where the one
    before it ends (an overlap would serve one tensor's bytes as another's rows; a gap or trailing bytes mean
    a tensor was dropped or the file was not written as its header says)."""
    position, previous = data_start, None
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin < position:
            raise ValueError(f"{path}: tensor {entry.name!r} (data bytes [{entry.begin - data_start}, "
                             f"{entry.end - data_start})) overlaps tensor {previous!r}, which ends at "
                             f"{position - data_start}")
        if entry.begin > position:
            raise ValueError(f"{path}: data bytes [{position - data_start}, {entry.begin - data_start}) belong to "
                             f"no tensor (a gap before {entry.name!r}: was a tensor dropped from the header?)")
        position, previous = entry.end, entry.name
    if position != size:
        raise ValueError(f"{path}: {size - position} trailing bytes after the last tensor's data (file is {size} "
                         f"bytes, its tensors end at byte {position})")


def _parse_entry(name: str, info, data_start: int, size: int, path: Path) -> TensorEntry:
    try:
        dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt header entry for {name!r}: {info!r}") from exc
    if dtype_name not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise ValueError(f"{path}: tensor {name!r} has bad data_offsets {[begin, end]!r}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{path}: tensor {name!r} holds {end - begin} bytes, shape {shape} of {dtype_name} "
                         f"needs {math.prod(shape) * dtype.itemsize}")
    if data_start + end > size:
        raise ValueError(f"{path}: tensor {name!r} data ends at byte {data_start + end}, past the end of the "
                         f"{size}-byte file (truncated?)")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)
