"""Engram table serving: the mapped safetensors reader, the store's lookups, shards, the hot-row cache.

References: the safetensors library (parsing), model_worker's in-process `EngramTable.lookup`, an e4m3 /
e8m0 bit decoder written here from the format definitions, and the Zipf distribution's top-k mass.
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import memory_service.engram_tables as engram_tables_module
from memory_service.engram_tables import (
    EngramTableStore,
    HotRowCache,
    MappedTableFile,
    ShardedEngramClient,
    engram_layer_rows,
    shard_ranges,
)
from model_worker.engram_tables import EngramTable, InProcessEngramTables
from model_worker.loading import ENGRAM_TABLES_FILE


def write_tables(directory: Path, tables: dict[int, EngramTable]) -> Path:
    """engram_tables.safetensors written by the safetensors library (the checkpoint format)."""
    items = {name: t.contiguous() for name, t in InProcessEngramTables(tables).state_dict_items()}
    save_file(items, str(directory / ENGRAM_TABLES_FILE))
    return directory / ENGRAM_TABLES_FILE


def mixed_tables() -> dict[int, EngramTable]:
    return {1: EngramTable.random(1000, 64, "fp8", seed=1, std=3.0),
            4: EngramTable.random(777, 32, "bfloat16", seed=2),
            6: EngramTable.random(50, 32, "float32", seed=3)}


def decode_e4m3(raw: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes -> float64, from the bit layout: s eeee mmm, bias 7, no infinities."""
    raw = raw.astype(np.int64)
    sign = np.where(raw >> 7, -1.0, 1.0)
    exponent, mantissa = (raw >> 3) & 0xF, raw & 0x7
    normal = (1 + mantissa / 8) * np.exp2(exponent - 7.0)
    subnormal = mantissa / 8 * 2.0**-6
    value = sign * np.where(exponent == 0, subnormal, normal)
    return np.where((exponent == 15) & (mantissa == 7), np.nan, value)


def formula_rows(file: Path, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """fp8 rows dequantized by the bit decoder: e4m3(byte) * 2 ** (e8m0 byte - 127)."""
    with safe_open(str(file), framework="pt") as handle:
        data = handle.get_tensor(f"engram.{layer}.table").view(torch.uint8).numpy()
        scales = handle.get_tensor(f"engram.{layer}.scales").view(torch.uint8).numpy()
    idx = ids.numpy()
    values = decode_e4m3(data[idx]) * np.repeat(np.exp2(scales[idx].astype(np.float64) - 127), 32, axis=-1)
    return torch.from_numpy(values).float()


# ---- MappedTableFile ------------------------------------------------------------------------------------
def test_mapped_views_equal_the_safetensors_library_tensors(tmp_path):
    tensors = {"a": torch.randn(37, 64).to(torch.float8_e4m3fn), "b": torch.randn(5, 3).bfloat16(),
               "c": torch.arange(12, dtype=torch.int64).reshape(3, 4), "d": torch.randn(7, 2, 3),
               "e": torch.randint(0, 255, (37, 2), dtype=torch.uint8).view(torch.float8_e8m0fnu)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"note": "x"})
    with MappedTableFile(tmp_path / "t.safetensors") as mapped, \
            safe_open(str(tmp_path / "t.safetensors"), framework="pt") as reference:
        assert mapped.names() == sorted(tensors) and mapped.metadata == {"note": "x"}
        for name in tensors:
            want = reference.get_tensor(name)
            got = mapped.tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        rows = mapped.tensor("a", rows=(10, 20))
        assert torch.equal(rows.view(torch.uint8), reference.get_tensor("a")[10:20].view(torch.uint8))
        assert mapped.tensor("a", rows=(5, 5)).shape == (0, 64)
        with pytest.raises(ValueError, match="rows"):
            mapped.tensor("a", rows=(30, 38))


def test_mapped_view_is_the_file_not_a_copy(tmp_path):
    """A MAP_SHARED view sees bytes written to the file after it was mapped."""
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.zeros(4, 8, dtype=torch.float32)}, str(path))
    mapped = MappedTableFile(path)
    view = mapped.tensor("x")
    begin = mapped.entry("x").begin
    with open(path, "r+b") as handle:
        handle.seek(begin + 4 * (8 * 2 + 3))  # element [2, 3]
        handle.write(struct.pack("<f", 1.5))
    assert view[2, 3].item() == 1.5 and view.sum().item() == 1.5
    mapped.close()


def test_close_leaves_live_views_readable(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}, str(path))
    mapped = MappedTableFile(path)
    view = mapped.tensor("x")[3:5]
    mapped.close()
    assert torch.equal(view, torch.arange(4096, dtype=torch.float32).reshape(64, 64)[3:5])
    with pytest.raises(ValueError, match="closed"):
        mapped.tensor("x")


def _corrupt(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.safetensors"
    save_file({"x": torch.zeros(16, 16)}, str(path))
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    body = raw[8 + header_len :]

    def rewrite(new_header: dict) -> bytes:
        text = json.dumps(new_header).encode()
        return struct.pack("<Q", len(text)) + text + body

    if kind == "tiny":
        data = raw[:5]
    elif kind == "truncated":
        data = raw[: len(raw) - 100]
    elif kind == "header_past_end":
        data = struct.pack("<Q", len(raw) * 2) + raw[8:]
    elif kind == "garbage_json":
        data = raw[:8] + b"{not json" + b" " * (header_len - 9) + body
    elif kind == "offset_past_end":
        header["x"]["data_offsets"] = [len(body), len(body) + 1024]
        data = rewrite(header)
    elif kind == "size_mismatch":
        header["x"]["shape"] = [16, 17]
        data = rewrite(header)
    elif kind == "unknown_dtype":
        header["x"]["dtype"] = "F4_WAT"
        data = rewrite(header)
    else:
        raise AssertionError(kind)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["tiny", "truncated", "header_past_end", "garbage_json", "offset_past_end",
                                  "size_mismatch", "unknown_dtype"])
def test_corrupt_table_file_raises_value_error_naming_the_file(tmp_path, kind):
    path = _corrupt(tmp_path, kind)
    with pytest.raises(ValueError, match=path.name):
        MappedTableFile(path)


# ---- EngramTableStore -----------------------------------------------------------------------------------
def test_store_rows_equal_in_process_tables_and_the_bit_formula(tmp_path):
    tables = mixed_tables()
    file = write_tables(tmp_path, tables)
    store = EngramTableStore(hot_cache_rows=0)
    store.add_model("m", tmp_path)
    gen = torch.Generator().manual_seed(0)
    for layer, table in tables.items():
        ids = torch.randint(0, table.rows, (3, 7, 4), generator=gen)
        rows = store.lookup("m", layer, ids)
        assert rows.dtype == torch.float32 and rows.shape == (3, 7, 4, table.head_dim)
        assert torch.equal(rows, table.lookup(ids))
        assert torch.equal(store.lookup("m", layer, ids, out_dtype=torch.bfloat16), table.lookup(ids).bfloat16())
        assert torch.equal(store.lookup("m", layer, ids.int()), rows)
    ids = torch.arange(tables[1].rows)
    assert torch.equal(store.lookup("m", 1, ids), formula_rows(file, 1, ids))
    assert store.layer_rows("m") == engram_layer_rows(file) == {1: 1000, 4: 777, 6: 50}
    store.close()


@pytest.mark.parametrize("rows,num_shards", [(10, 1), (10, 3), (1000, 7), (2, 3), (0, 2), (12, 4)])
def test_shard_ranges_are_contiguous_balanced_and_cover_all_rows(rows, num_shards):
    ranges = shard_ranges(rows, num_shards)
    assert len(ranges) == num_shards and ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert set(sizes) <= {rows // num_shards, -(-rows // num_shards)}
    assert sizes.count(rows // num_shards + 1) == rows % num_shards
    assert shard_ranges(rows, num_shards) == ranges  # a function of (rows, N) alone


@pytest.mark.parametrize("parallel_min_ids", [0, 10**9])  # fan out on threads / one shard after another
def test_shard_stores_map_only_their_rows_and_the_client_reassembles_in_order(tmp_path, parallel_min_ids):
    tables = mixed_tables()
    write_tables(tmp_path, tables)
    stores = [EngramTableStore(hot_cache_rows=0) for _ in range(3)]
    for i, store in enumerate(stores):
        store.add_model("m", tmp_path, shard=i, num_shards=3)
    stats = [store.stats()["m"][1] for store in stores]
    assert [s["row_range"] for s in stats] == shard_ranges(1000, 3)
    assert sum(s["bytes_mapped"] for s in stats) == 1000 * (64 + 2)
    client = ShardedEngramClient("m", stores, stores[0].layer_rows("m"), parallel_min_ids=parallel_min_ids)
    gen = torch.Generator().manual_seed(1)
    for layer, table in tables.items():
        ids = torch.randint(0, table.rows, (5, 11, 3), generator=gen)
        assert torch.equal(client.lookup(layer, ids), table.lookup(ids))
        assert torch.equal(client.prefetch(layer, ids).result(), table.lookup(ids))
    assert client.lookup(1, torch.empty(0, 3, dtype=torch.int64)).shape == (0, 3, 64)
    lo, hi = stats[1]["row_range"]
    assert torch.equal(stores[1].lookup("m", 1, torch.arange(lo, hi)), tables[1].lookup(torch.arange(lo, hi)))
    client.close()
    for store in stores:
        store.close()


def test_bad_lookups_raise_clear_errors_and_the_store_keeps_serving(tmp_path):
    tables = mixed_tables()
    write_tables(tmp_path, tables)
    store = EngramTableStore(hot_cache_rows=0)
    store.add_model("m", tmp_path, shard=1, num_shards=2)  # rows [500, 1000) of layer 1
    ids = torch.tensor([500, 999, 700])
    before = store.lookup("m", 1, ids)
    bad_calls = [
        (("nope", 1, ids), "model"),
        (("m", 2, ids), "layer"),
        (("m", 1, torch.tensor([499, 600])), r"hash_ids: .*\[500, 1000\)"),
        (("m", 1, torch.tensor([1000])), "hash_ids"),
    ]
    for args, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            store.lookup(*args)
    for bad_ids in (ids.float(), [500, 501]):  # the in-process tables' error type (see test_api_edges)
        with pytest.raises(TypeError, match="hash_ids: expected an int64"):
            store.lookup("m", 1, bad_ids)
    with pytest.raises(ValueError, match="out_dtype"):
        store.lookup("m", 1, ids, out_dtype=torch.int8)
    assert torch.equal(store.lookup("m", 1, ids), before)
    assert torch.equal(before, tables[1].lookup(ids))
    assert store.stats()["m"][1]["lookups"] == 2


def test_add_model_rejects_files_that_are_not_engram_tables(tmp_path):
    fp8 = EngramTable.random(40, 32, "fp8")
    cases = {"noscales": {"engram.1.table": fp8.data},
             "badscales": {"engram.1.table": fp8.data, "engram.1.scales": fp8.scales[:-1].contiguous()},
             "extra": {"engram.1.table": fp8.data, "engram.1.scales": fp8.scales, "model.embed": torch.zeros(2)},
             "orphan": {"engram.2.scales": fp8.scales},
             "plainscales": {"engram.1.table": torch.zeros(40, 32), "engram.1.scales": fp8.scales}}
    store = EngramTableStore()
    for name, tensors in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=name):
            store.add_model(name, tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError):
        store.add_model("x", tmp_path / "missing")
    write_tables(tmp_path, mixed_tables())
    for kwargs in ({"shard": 2, "num_shards": 2}, {"shard": 0, "num_shards": 0}, {"shard": -1}):
        with pytest.raises(ValueError, match="shard"):
            store.add_model("m", tmp_path, **kwargs)
    store.add_model("m", tmp_path)
    with pytest.raises(ValueError, match="already"):
        store.add_model("m", tmp_path)
    assert store.models() == ["m"]
    store.remove_model("m")
    with pytest.raises(ValueError, match="model"):
        store.lookup("m", 1, torch.tensor([0]))


def test_pinned_tables_are_copied_off_the_map_and_give_the_same_rows(tmp_path, monkeypatch):
    """The pin path with the CPU standing in for the GPU (no CUDA here): copy, close the file, same rows."""
    monkeypatch.setattr(engram_tables_module, "_pin_device", lambda pin_gpu: torch.device("cpu") if pin_gpu else None)
    tables = mixed_tables()
    write_tables(tmp_path, tables)
    store = EngramTableStore(pin_gpu=True)
    store.add_model("m", tmp_path, shard=0, num_shards=2)
    stats = store.stats()["m"][1]
    assert stats["device"] == "cpu" and stats["bytes_mapped"] == 0 and stats["hot_cache_rows"] == 0
    ids = torch.randint(0, 500, (9, 4))
    assert torch.equal(store.lookup("m", 1, ids), tables[1].lookup(ids))


# ---- hot-row cache --------------------------------------------------------------------------------------
def zipf_ids(n: int, rows: int, s: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws of Zipf(s) over ranks 1..rows, ranks shuffled onto ids; and the probabilities by rank."""
    probs = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** s
    probs /= probs.sum()
    ranks = torch.multinomial(probs, n, replacement=True, generator=generator)
    return torch.randperm(rows, generator=generator)[ranks], probs


def test_hot_cache_serves_identical_rows_and_counts_every_id(tmp_path):
    tables = mixed_tables()
    write_tables(tmp_path, tables)
    store = EngramTableStore(hot_cache_rows=64, hot_cache_window=200)
    store.add_model("m", tmp_path)
    gen = torch.Generator().manual_seed(2)
    total = 0
    for _ in range(60):
        ids, _ = zipf_ids(48, 1000, 1.2, gen)
        ids = ids.reshape(2, 24)
        assert torch.equal(store.lookup("m", 1, ids), tables[1].lookup(ids))
        assert torch.equal(store.lookup("m", 1, ids, out_dtype=torch.bfloat16), tables[1].lookup(ids).bfloat16())
        total += 2 * ids.numel()
    stats = store.stats()["m"][1]
    assert stats["hits"] + stats["misses"] == stats["ids"] == total
    assert 0 < stats["cached"] <= 64 and stats["hits"] > 0 and stats["hit_rate"] == stats["hits"] / total


def test_hot_cache_hit_rate_approaches_the_top_rows_zipf_mass():
    """Capacity C on Zipf(1.1) traffic: the hit rate after warm-up is close to the mass of the C most likely ids
    (the best any cache of C rows can do)."""
    rows, capacity = 50_000, 500
    cache = HotRowCache(capacity, head_dim=4, window=2000)
    fetch = lambda ids: ids[:, None].float().expand(-1, 4) * 0.5  # row of id i = [i/2] * 4
    gen = torch.Generator().manual_seed(3)
    ids, probs = zipf_ids(80_000, rows, 1.1, gen)
    for chunk in ids[:20_000].split(100):
        cache.lookup(chunk, fetch)
    hits_before, misses_before = cache.hits, cache.misses
    for chunk in ids[20_000:].split(100):
        assert torch.equal(cache.lookup(chunk, fetch), fetch(chunk))
    measured = (cache.hits - hits_before) / (cache.hits + cache.misses - hits_before - misses_before)
    ideal = float(probs[:capacity].sum())
    assert 0.9 * ideal <= measured <= ideal + 0.02, (measured, ideal)
    assert cache.cached == capacity


def test_concurrent_lookups_with_cache_rebuilds_all_return_exact_rows(tmp_path):
    tables = mixed_tables()
    write_tables(tmp_path, tables)
    store = EngramTableStore(hot_cache_rows=32, hot_cache_window=50)
    store.add_model("m", tmp_path)
    errors = []

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(40):
            ids, _ = zipf_ids(24, 1000, 1.0, gen)
            if not torch.equal(store.lookup("m", 1, ids), tables[1].lookup(ids)):
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.stats()["m"][1]["ids"] == 6 * 40 * 24


# ---- client ---------------------------------------------------------------------------------------------
def test_client_rejects_bad_input_and_bad_shard_replies(tmp_path):
    tables = mixed_tables()
    write_tables(tmp_path, tables)
    store = EngramTableStore()
    store.add_model("m", tmp_path)
    client = ShardedEngramClient("m", [store], store.layer_rows("m"))
    with pytest.raises(ValueError, match="layer_id"):
        client.lookup(2, torch.tensor([0]))
    with pytest.raises(ValueError, match="hash_ids"):
        client.lookup(1, torch.tensor([1000]))
    with pytest.raises(TypeError, match="hash_ids"):
        client.lookup(1, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="hash_ids"):
        client.prefetch(1, torch.tensor([-1])).result()

    class Truncating:
        def lookup(self, model, layer, hash_ids, out_dtype=torch.float32):
            return store.lookup(model, layer, hash_ids, out_dtype)[:-1]

    with pytest.raises(RuntimeError, match="shard 0"):
        ShardedEngramClient("m", [Truncating()], store.layer_rows("m")).lookup(1, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"shards\[1\]"):
        ShardedEngramClient("m", [store, object()], store.layer_rows("m"))
    with pytest.raises(ValueError, match="layers_rows"):
        ShardedEngramClient("m", [store], {1: 0})


# ---- resident-page budget -------------------------------------------------------------------------------
def test_resident_budget_drops_mapped_pages_once_exceeded(tmp_path):
    """The budget releases exactly when the fault windows charged pass it (full check: test_engram_memory_budget)."""
    table = EngramTable.random(40_000, 256, "fp8")  # 10.5 MB: about 6 fault windows of 2 MiB
    write_tables(tmp_path, {1: table})
    budgeted = EngramTableStore(hot_cache_rows=0, resident_budget_bytes=1)
    unbounded = EngramTableStore(hot_cache_rows=0)
    for store in (budgeted, unbounded):
        store.add_model("m", tmp_path)
        for chunk in torch.arange(40_000).split(4000):
            assert torch.equal(store.lookup("m", 1, chunk), table.lookup(chunk))
    assert budgeted.residency_stats()["releases"] == 10 and budgeted.residency_stats()["charged_bytes"] == 0
    assert unbounded.residency_stats()["releases"] == 0


def test_hot_cache_fills_under_inference_mode_and_serves_outside_it(tmp_path):
    """The engine prefills under torch.inference_mode and decodes on another thread outside it."""
    tables = mixed_tables()
    write_tables(tmp_path, tables)
    store = EngramTableStore(hot_cache_rows=16, hot_cache_window=30)
    store.add_model("m", tmp_path)
    ids = torch.arange(40) % 20  # fills all 16 slots, so later rows are written into the same pool
    with torch.inference_mode():
        assert torch.equal(store.lookup("m", 1, ids), tables[1].lookup(ids))
    for _ in range(3):
        assert torch.equal(store.lookup("m", 1, ids + 100), tables[1].lookup(ids + 100))
    assert store.stats()["m"][1]["hits"] > 0 and store.stats()["m"][1]["cached"] == 16


def test_streamed_fp8_writer_round_trips_through_safetensors_and_checks_chunk_sizes(tmp_path):
    """write_fp8_table_streamed: the safetensors library reads back exactly the chunks written; chunks that
    do not add up to the declared rows raise and leave no file."""
    from memory_service.table_writer import write_fp8_table_streamed

    rng = np.random.default_rng(3)
    data = [rng.integers(0, 256, (n, 64), dtype=np.uint8) for n in (5, 1, 4)]
    scales = [rng.integers(0, 256, (n, 2), dtype=np.uint8) for n in (7, 3)]
    path = tmp_path / "t.safetensors"
    write_fp8_table_streamed(path, 2, 10, 64, iter(data), iter(scales))
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["engram.2.scales", "engram.2.table"]
        table, table_scales = f.get_tensor("engram.2.table"), f.get_tensor("engram.2.scales")
    assert table.dtype == torch.float8_e4m3fn and table_scales.dtype == torch.float8_e8m0fnu
    assert np.array_equal(table.view(torch.uint8).numpy(), np.concatenate(data))
    assert np.array_equal(table_scales.view(torch.uint8).numpy(), np.concatenate(scales))
    for short_data, short_scales, match in ((data[:2], scales, "data_chunks: 6 rows"),
                                            (data, scales + scales, "scale_chunks: more than"),
                                            ([d.astype(np.int16) for d in data], scales, "uint8")):
        bad = tmp_path / "bad.safetensors"
        with pytest.raises(ValueError, match=match):
            write_fp8_table_streamed(bad, 2, 10, 64, iter(short_data), iter(short_scales))
        assert not bad.exists()
