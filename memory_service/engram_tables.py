"""Engram tables served by one memory-service replica (or one shard of them): `EngramTableStore`.

A model's tables (`engram.{layer}.table` e4m3 with `engram.{layer}.scales` e8m0 per 32 values, or
bf16/fp32 tables without scales: the dtypes the in-process tables take) are memory-mapped from
`engram_tables.safetensors`; a shard maps only its row range (`shard_ranges`). `lookup` gathers and
dequantizes rows with the same kernel as the in-process tables (`engram_kernels.engram.engram_gather`), through a
per-layer hot-row cache. Optional: `pin_gpu` copies the shard's tables to the GPU when CUDA is present;
`resident_budget_bytes` bounds the table pages kept mapped in this process (RSS) by dropping them (madvise)
once that many bytes may have been faulted in. Every lookup first checks that the table file was not
truncated or replaced since it was mapped (`TableFileChanged`); `verify(model)` checks its optional checksum.
Bad input raises the error the in-process tables raise for it (TypeError for ids that are not an int
tensor, ValueError for the rest) and leaves the store serving everyone else.

This module also re-exports the pieces callers need with it: `shard_ranges`, `ShardedEngramClient` (the
engine-side client), `MappedTableFile`, `HotRowCache`. Transport (Ray, HTTP) is not its job.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engram_kernels.engram import engram_gather
from engram_kernels.engram.gather import OUT_DTYPES, SCALE_BLOCK
from memory_service.engram_client import ShardedEngramClient, check_id_type
from memory_service.engram_wire import encode_rows
from memory_service.hot_cache import HotRowCache
from memory_service.sharding import shard_ranges
from memory_service.table_file import (
    CHECKSUM_KEY,
    FAULT_WINDOW_BYTES,
    MappedTableFile,
    TableFileChanged,
    TableFileCorrupt,
)
from model_worker.engram_tables import TABLE_FORMATS
from model_worker.loading import ENGRAM_TABLES_FILE

__all__ = ["EngramTableStore", "HotRowCache", "MappedTableFile", "ShardedEngramClient", "TableFileChanged",
           "TableFileCorrupt", "engram_layer_rows", "shard_ranges"]

TABLE_DTYPES = tuple(TABLE_FORMATS.values())  # the in-process rule (model_worker), so one file loads in both or neither
_TENSOR_NAME = re.compile(r"engram\.(\d+)\.(table|scales)")


@dataclass
class ServedTable:
    """One layer's rows [lo, hi) of a `table_rows`-row table: data [hi - lo, D] (+ scales [hi - lo, D/32])."""

    data: torch.Tensor
    scales: torch.Tensor | None
    row_range: tuple[int, int]
    table_rows: int
    cache: HotRowCache | None
    lookups: int = 0
    ids: int = 0

    @property
    def head_dim(self) -> int:
        return self.data.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales) if t is not None)


@dataclass
class ServedModel:
    file: MappedTableFile | None  # None once pinned tables were copied off the map
    tables: dict[int, ServedTable] = field(default_factory=dict)


def table_file_path(path: str | Path) -> Path:
    """A checkpoint directory (-> its engram_tables.safetensors) or the table file itself."""
    path = Path(path)
    file = path / ENGRAM_TABLES_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"path: no Engram table file at {file}")
    return file


def engram_layer_rows(path: str | Path) -> dict[int, int]:
    """{layer: table rows} from a table file's header alone (what `ShardedEngramClient` needs)."""
    with MappedTableFile(table_file_path(path)) as file:
        return {layer: parts["table"].rows for layer, parts in _layer_entries(file).items()}


def _layer_entries(file: MappedTableFile) -> dict[int, dict]:
    """Group and check the file's tensors: {layer: {"table": entry, "scales": entry?}}."""
    layers: dict[int, dict] = {}
    for name in file.names():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{file.path}: unexpected tensor {name!r} (want engram.<layer>.table|scales)")
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = file.entry(name)
    for layer, parts in layers.items():
        table, scales = parts.get("table"), parts.get("scales")
        if table is None:
            raise ValueError(f"{file.path}: engram.{layer}.scales without engram.{layer}.table")
        if len(table.shape) != 2 or table.dtype not in TABLE_DTYPES:
            raise ValueError(f"{file.path}: engram.{layer}.table must be [rows, head_dim] of {TABLE_DTYPES}, "
                             f"got {list(table.shape)} {table.dtype}")
        if table.dtype == torch.float8_e4m3fn:
            want = (table.shape[0], table.shape[1] // SCALE_BLOCK)
            if table.shape[1] % SCALE_BLOCK or scales is None or scales.dtype != torch.float8_e8m0fnu \
                    or scales.shape != want:
                raise ValueError(f"{file.path}: fp8 engram.{layer}.table needs float8_e8m0fnu scales of shape "
                                 f"{list(want)}, got {None if scales is None else (list(scales.shape), scales.dtype)}")
        elif scales is not None:
            raise ValueError(f"{file.path}: engram.{layer}.scales given for a {table.dtype} table")
    return layers


def _pin_device(pin_gpu: bool) -> torch.device | None:
    return torch.device("cuda") if pin_gpu and torch.cuda.is_available() else None


class EngramTableStore:
    """The Engram tables of one or more models, as served by one replica or shard."""

    def __init__(self, *, hot_cache_rows: int = 65536, hot_cache_window: int | None = None, pin_gpu: bool = False,
                 resident_budget_bytes: int | None = None) -> None:
        if hot_cache_rows < 0:
            raise ValueError(f"hot_cache_rows: must be >= 0, got {hot_cache_rows}")
        if resident_budget_bytes is not None and resident_budget_bytes < 1:
            raise ValueError(f"resident_budget_bytes: must be >= 1 or None, got {resident_budget_bytes}")
        self.hot_cache_rows = hot_cache_rows
        self.hot_cache_window = hot_cache_window
        self.pin_device = _pin_device(pin_gpu)
        self.resident_budget_bytes = resident_budget_bytes
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()  # models dict, counters, residency accounting
        self._charged = 0  # bytes that may have been faulted in since the last release (upper bound)
        self._releases = 0

    # ---- tables ----------------------------------------------------------------------------------
    def add_model(self, model: str, path: str | Path, *, shard: int = 0, num_shards: int = 1,
                  verify: bool = False) -> None:
        """Map this shard's rows of every Engram layer in `path` (checkpoint dir or table file). verify: check
        the file's checksum first (reads the whole file; ValueError if the file has none or it mismatches)."""
        if not isinstance(model, str) or not model:
            raise ValueError(f"model: expected a non-empty name, got {model!r}")
        if not isinstance(num_shards, int) or num_shards < 1 or not isinstance(shard, int) \
                or not 0 <= shard < num_shards:
            raise ValueError(f"shard: expected 0 <= shard < num_shards, got shard={shard!r} num_shards={num_shards!r}")
        if model in self._models:
            raise ValueError(f"model: {model!r} is already served by this store")
        file = MappedTableFile(table_file_path(path))
        try:
            if verify and not file.verify():
                raise ValueError(f"{file.path}: verify=True but the file records no checksum ({CHECKSUM_KEY})")
            served = ServedModel(file)
            for layer, parts in sorted(_layer_entries(file).items()):
                rows = parts["table"].rows
                lo, hi = shard_ranges(rows, num_shards)[shard]
                data = file.tensor(parts["table"].name, rows=(lo, hi))
                scales = file.tensor(parts["scales"].name, rows=(lo, hi)) if "scales" in parts else None
                if self.pin_device is not None:
                    data = data.to(self.pin_device)
                    scales = None if scales is None else scales.to(self.pin_device)
                cache = None if self.hot_cache_rows == 0 or self.pin_device is not None else \
                    HotRowCache(self.hot_cache_rows, data.shape[1], self.hot_cache_window)
                served.tables[layer] = ServedTable(data, scales, (lo, hi), rows, cache)
            if self.pin_device is not None:
                file.close()
                served.file = None
        except BaseException:
            file.close()
            raise
        with self._lock:
            if model in self._models:
                file.close()
                raise ValueError(f"model: {model!r} is already served by this store")
            self._models[model] = served

    def remove_model(self, model: str) -> None:
        with self._lock:
            served = self._models.pop(model, None)
        if served is None:
            raise ValueError(f"model: {model!r} is not served by this store")
        if served.file is not None:
            served.file.close()

    def models(self) -> list[str]:
        return sorted(self._models)

    def verify(self, model: str) -> bool:
        """Check the model's table file against its checksum now: True if it matches, False if the file has
        none; TableFileCorrupt / TableFileChanged if not. (Pinned tables were copied off the file: False.)"""
        served = self._served(model)
        return False if served.file is None else served.file.verify()

    def layer_rows(self, model: str) -> dict[int, int]:
        """{layer: rows of the whole table} (all shards), e.g. for `ShardedEngramClient`."""
        return {layer: table.table_rows for layer, table in self._served(model).tables.items()}

    # ---- lookup ----------------------------------------------------------------------------------
    def lookup(self, model: str, layer: int, hash_ids: torch.Tensor,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows of one layer.  hash_ids int64 [...] (global row ids in this shard's range)
        -> rows [..., head_dim] of out_dtype, on hash_ids' device."""
        table = self._table(model, layer)
        file = self._served(model).file
        if file is not None:  # before any mapped read (the hot cache's misses read the map too)
            file.check_unchanged()
        _check_ids(hash_ids, table.row_range, model, layer)
        if out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype: expected one of {OUT_DTYPES}, got {out_dtype}")
        flat = hash_ids.reshape(-1).long()
        lo = table.row_range[0]
        if self.pin_device is not None:
            rows = engram_gather(table.data, table.scales, flat.to(self.pin_device) - lo, out_dtype)
        elif table.cache is not None:
            rows = table.cache.lookup(flat.cpu(), lambda ids: self._gather(table, ids, torch.float32))
            rows = rows.to(out_dtype)
        else:
            rows = self._gather(table, flat.cpu(), out_dtype)
        with self._lock:
            table.lookups += 1
            table.ids += flat.numel()
        return rows.to(hash_ids.device).reshape(*hash_ids.shape, table.head_dim)

    def lookup_encoded(self, model: str, layer: int, hash_ids: torch.Tensor) -> dict:
        """Rows of one layer in the table's own format, for the wire (`memory_service.engram_wire`).
        hash_ids int64 [n] (global row ids in this shard's range) -> `encode_rows` output for n rows. Reads
        the table, not the hot-row cache (which holds dequantized rows); counted as a lookup."""
        table = self._table(model, layer)
        file = self._served(model).file
        if file is not None:
            file.check_unchanged()
        _check_ids(hash_ids, table.row_range, model, layer)
        if hash_ids.dim() != 1:
            raise ValueError(f"hash_ids: expected a flat [n] tensor, got shape {list(hash_ids.shape)}")
        local = hash_ids.long().cpu() - table.row_range[0]
        encoded = encode_rows(table.data, table.scales, local)
        if self.resident_budget_bytes is not None and file is not None:
            touched = sum(_fault_windows(t, local) for t in (table.data, table.scales) if t is not None)
            self._charge(touched * FAULT_WINDOW_BYTES)
        with self._lock:
            table.lookups += 1
            table.ids += local.numel()
        return encoded

    def _gather(self, table: ServedTable, ids: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Rows of global ids [n] straight from the mapped table -> [n, head_dim]."""
        local = ids - table.row_range[0]
        rows = engram_gather(table.data, table.scales, local, out_dtype)
        if self.resident_budget_bytes is not None:
            touched = sum(_fault_windows(t, local) for t in (table.data, table.scales) if t is not None)
            self._charge(touched * FAULT_WINDOW_BYTES)
        return rows

    def _charge(self, nbytes: int) -> None:
        """Count bytes possibly faulted in; past the budget, drop every mapped page of this store."""
        with self._lock:
            self._charged += nbytes
            if self._charged <= self.resident_budget_bytes:
                return
            self._charged = 0
            self._releases += 1
            for served in self._models.values():
                if served.file is not None:
                    served.file.release()

    def _served(self, model: str) -> ServedModel:
        served = self._models.get(model)
        if served is None:
            raise ValueError(f"model: {model!r} is not served by this store (have {self.models()})")
        return served

    def _table(self, model: str, layer: int) -> ServedTable:
        served = self._served(model)
        if layer not in served.tables:
            raise ValueError(f"layer: model {model!r} has no Engram table for layer {layer!r} "
                             f"(have {sorted(served.tables)})")
        return served.tables[layer]

    # ---- figures ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        """{model: {layer: {rows, row_range, table_rows, head_dim, dtype, device, bytes_mapped, lookups, ids,
        hot_cache_rows, cached, hits, misses, hit_rate}}}"""
        out: dict = {}
        for model, served in list(self._models.items()):
            for layer, table in served.tables.items():
                cache = table.cache.stats() if table.cache is not None else \
                    {"capacity": 0, "cached": 0, "hits": 0, "misses": table.ids, "hit_rate": 0.0}
                out.setdefault(model, {})[layer] = {
                    "rows": table.row_range[1] - table.row_range[0], "row_range": table.row_range,
                    "table_rows": table.table_rows, "head_dim": table.head_dim, "dtype": str(table.data.dtype),
                    "device": "mmap" if served.file is not None else str(table.data.device),
                    "bytes_mapped": table.nbytes if served.file is not None else 0,
                    "lookups": table.lookups, "ids": table.ids, "hot_cache_rows": cache["capacity"],
                    "cached": cache["cached"], "hits": cache["hits"], "misses": cache["misses"],
                    "hit_rate": cache["hit_rate"]}
        return out

    def residency_stats(self) -> dict:
        """The resident-page budget: {budget_bytes, charged_bytes, releases}."""
        return {"budget_bytes": self.resident_budget_bytes, "charged_bytes": self._charged,
                "releases": self._releases}

    def close(self) -> None:
        with self._lock:
            models, self._models = self._models, {}
        for served in models.values():
            if served.file is not None:
                served.file.close()


def _check_ids(hash_ids: torch.Tensor, row_range: tuple[int, int], model: str, layer: int) -> None:
    check_id_type(hash_ids)
    if hash_ids.numel():
        low, high = (int(v) for v in torch.aminmax(hash_ids))
        lo, hi = row_range
        if low < lo or high >= hi:
            raise ValueError(f"hash_ids: this store serves rows [{lo}, {hi}) of {model!r} layer {layer}, "
                             f"got min {low} max {high}")


def _fault_windows(view: torch.Tensor, rows: torch.Tensor) -> int:
    """Distinct fault windows the given rows of a mapped view lie in.  rows int64 [n] (local)"""
    if not rows.numel():
        return 0
    row_bytes = view.stride(0) * view.element_size()
    first = view.data_ptr() + rows * row_bytes
    windows = torch.cat([first // FAULT_WINDOW_BYTES, (first + row_bytes - 1) // FAULT_WINDOW_BYTES])
    return int(torch.unique(windows).numel())
