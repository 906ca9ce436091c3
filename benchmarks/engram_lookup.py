"""Engram table lookups: gather + dequant throughput, and what the tables cost model decode.

Part 1: a V4.1-shaped fp8 table (head_dim 256, e4m3 + one e8m0 scale per 32 values, 264 bytes a row)
written to a file and memory-mapped by `EngramTableStore`. For decode-sized (24 ids x batch 1..64) and
prefill-sized (24 x 4096) id sets: rows/s and table GB/s of (a) a plain numpy fancy-index gather of the
same bytes from the same mapping (no dequant: the practical bound), (b) the gather + dequant kernel on the
mapped tensors, (c) the store's lookup with uniform ids (hot cache off: every row from the map), and
(d) the store with Zipf(1.0) ids through its hot-row cache (hit rate shown).

Part 2: decode tokens/s through LLMEngine of a small model of our architecture (MLA + mHC + MoE, Engram
on two layers) with the tables in-process, through `ShardedEngramClient` over 2 shard stores, and the
same model without Engram layers. The Engram paper lost 1.9-2.8% throughput with its tables in host DRAM.

    python benchmarks/engram_lookup.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, peak_rss_mib  # noqa: E402
from decode import ours_tokens_per_s  # noqa: E402

HEAD_DIM = 256
ROW_BYTES = HEAD_DIM + HEAD_DIM // 32
IDS_PER_TOKEN = 24  # (max_ngram 4 - 1) * 8 heads, one Engram layer of V4.1


def write_random_fp8_table(path: Path, rows: int, chunk: int = 1 << 18) -> None:
    """engram_tables.safetensors with one fp8 layer of random finite e4m3 bytes and scales near 2**-4,
    written in chunks."""
    from memory_service.table_writer import write_fp8_table_streamed

    rng = np.random.default_rng(0)
    sizes = [min(chunk, rows - lo) for lo in range(0, rows, chunk)]
    finite = (rng.integers(0, 256, (n, HEAD_DIM), dtype=np.uint8) for n in sizes)
    data = (np.where((raw & 0x7F) == 0x7F, raw ^ 1, raw).astype(np.uint8) for raw in finite)
    scales = (rng.integers(118, 126, (n, HEAD_DIM // 32), dtype=np.uint8) for n in sizes)
    write_fp8_table_streamed(path, 1, rows, HEAD_DIM, data, scales)


def zipf_batches(rows: int, n_ids: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` batches of n_ids Zipf(1.0) ids over the table (rank r has probability ~ 1/r), ranks shuffled."""
    gen = np.random.default_rng(seed)
    ranks = np.arange(1, rows + 1, dtype=np.float64)
    cdf = np.cumsum(1.0 / ranks)
    cdf /= cdf[-1]
    perm = gen.permutation(rows)
    return [torch.from_numpy(perm[np.minimum(np.searchsorted(cdf, gen.random(n_ids)), rows - 1)])
            for _ in range(count)]


def numpy_gather(data: np.ndarray, scales: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bound: the same table bytes moved by numpy fancy indexing, no dequant."""
    return data[ids], scales[ids]


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, float]:
    """Seconds per call of each callable: median over `repeats` samples of `inner` calls, the callables
    taking turns sample by sample (so load from other processes hits them alike)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(inner):
                call()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def gather_rows(path: Path, rows: int, sizes: list[tuple[str, int]], repeats: int) -> list[tuple]:
    from engram_kernels.engram import engram_gather
    from memory_service.engram_tables import EngramTableStore

    plain = EngramTableStore(hot_cache_rows=0)
    plain.add_model("bench", path)
    cached = EngramTableStore(hot_cache_rows=65536)
    cached.add_model("bench", path)
    table = plain._table("bench", 1)  # the mapped views, for the kernel-only and numpy figures
    data_np, scales_np = table.data.view(torch.uint8).numpy(), table.scales.view(torch.uint8).numpy()
    int(data_np[::4096, 0].sum()) + int(scales_np[::512, 0].sum())  # fault every page in once
    gen = torch.Generator().manual_seed(0)
    results = []
    for label, n_ids in sizes:
        ids = torch.randint(0, rows, (n_ids,), generator=gen)
        batches = zipf_batches(rows, n_ids, count=max(8, 200_000 // n_ids), seed=n_ids)
        cycle = itertools.cycle(batches)
        for _ in range(len(batches)):  # warm the hot cache over one pass of the batches
            cached.lookup("bench", 1, next(cycle))
        before = cached.stats()["bench"][1]
        seconds = interleaved_medians({
            "numpy": partial(numpy_gather, data_np, scales_np, ids.numpy()),
            "kernel": partial(engram_gather, table.data, table.scales, ids),
            "store": partial(plain.lookup, "bench", 1, ids),
            "cached": lambda cycle=cycle: cached.lookup("bench", 1, next(cycle)),
        }, repeats, inner=max(1, 2048 // n_ids))
        after = cached.stats()["bench"][1]
        hit_rate = (after["hits"] - before["hits"]) / max(1, after["ids"] - before["ids"])
        results.append((label, n_ids, seconds["numpy"], seconds["kernel"], seconds["store"], seconds["cached"],
                        hit_rate))
    plain.close()
    cached.close()
    return results


def bench_config(tokenizer, engram_vocab_size: int, engram: bool):
    from model_worker import ModelConfig

    return ModelConfig.from_dict(dict(
        model_type="engram_mhc", vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=512,
        moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128,
        qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1, max_position_embeddings=2048,
        hc_mult=4, engram_layer_ids=[1, 3] if engram else [], engram_max_ngram_size=3, engram_n_heads=4,
        engram_head_dim=64, engram_vocab_size=engram_vocab_size,
        engram_num_embeddings=tokenizer.compressed_vocab_size, engram_pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def decode_rates(levels: list[int], new_tokens: int, engram_vocab_size: int, rounds: int) -> tuple[list, dict]:
    """tokens/s per concurrency level for: in-process tables, 2-shard service, no Engram."""
    from memory_service.engram_tables import EngramTableStore, ShardedEngramClient
    from model_worker import build_random_model, save_model
    from model_worker.demo_tokenizer import build_demo_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_demo_tokenizer(Path(tmp) / "tok")
        token_map = torch.tensor(tokenizer.compressed_token_map(), dtype=torch.int64)
        model = build_random_model(bench_config(tokenizer, engram_vocab_size, True), seed=0, token_map=token_map)
        plain = build_random_model(bench_config(tokenizer, engram_vocab_size, False), seed=0)
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)  # same weights, minus Engram
        assert not missing and all("engram" in name for name in unexpected), (missing, unexpected)
        save_model(model, Path(tmp) / "ckpt")
        stores = [EngramTableStore(hot_cache_window=1024) for _ in range(2)]
        for shard, store in enumerate(stores):
            store.add_model("bench", Path(tmp) / "ckpt", shard=shard, num_shards=2)
        in_process = model.engram_tables
        client = ShardedEngramClient("bench", stores, stores[0].layer_rows("bench"))
        info = {"table_rows": sum(stores[0].layer_rows("bench").values()),
                "table_mib": sum(t.data.numel() + (t.scales.numel() if t.scales is not None else 0)
                                 for t in in_process.tables.values()) / 2**20}
        rows = []
        for concurrency in levels:
            rates = {"in_process": [], "service": [], "none": []}
            for _ in range(rounds):  # interleaved rounds: machine noise hits all three alike
                model.attach_engram_tables(in_process)
                rates["in_process"].append(ours_tokens_per_s(model, tokenizer, concurrency, new_tokens, "bf16"))
                model.attach_engram_tables(client)
                rates["service"].append(ours_tokens_per_s(model, tokenizer, concurrency, new_tokens, "bf16"))
                rates["none"].append(ours_tokens_per_s(plain, tokenizer, concurrency, new_tokens, "bf16"))
            rows.append((concurrency, *(statistics.median(rates[k]) for k in ("in_process", "service", "none"))))
        info["hit_rate"] = statistics.mean(s["hit_rate"] for store in stores for s in store.stats()["bench"].values())
        model.attach_engram_tables(in_process)
        client.close()
        for store in stores:
            store.close()
    return rows, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = 1_000_000 if args.quick else 4_000_000
    batches = [1, 8] if args.quick else [1, 8, 64]
    sizes = [(f"decode x{b}", IDS_PER_TOKEN * b) for b in batches] + [("prefill 4096", IDS_PER_TOKEN * 4096)]
    repeats = 9 if args.quick else 25
    levels, new_tokens, rounds = ([1, 8], 16, 1) if args.quick else ([1, 8, 32], 32, 3)
    engram_vocab = 20_000 if args.quick else 200_000

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "engram_tables.safetensors"
        start = time.perf_counter()
        write_random_fp8_table(path, rows)
        written = time.perf_counter() - start
        gather = gather_rows(path, rows, sizes, repeats)
    decode, info = decode_rates(levels, new_tokens, engram_vocab, rounds)

    print(f"Engram gather + dequant: fp8 table {rows:,} rows x {HEAD_DIM} (+ e8m0 scales) = "
          f"{rows * ROW_BYTES / 2**30:.2f} GiB, memory-mapped (page cache warm: written {written:.1f} s before)")
    print(machine_line())
    print(f"{'ids':>18}{'numpy bytes':>13}{'kernel':>10}{'store':>10}{'store zipf':>12}{'hit':>6}"
          f"{'store GB/s':>12}{'numpy GB/s':>12}{'store/numpy':>13}")
    print(f"{'':>18}{'Mrows/s':>13}{'Mrows/s':>10}{'Mrows/s':>10}{'Mrows/s':>12}")
    for label, n, t_numpy, t_kernel, t_store, t_cached, hit in gather:
        rates = [n / seconds / 1e6 for seconds in (t_numpy, t_kernel, t_store, t_cached)]
        print(f"{label + f' ({n})':>18}{rates[0]:>13.2f}{rates[1]:>10.2f}{rates[2]:>10.2f}"
              f"{rates[3]:>12.2f}{hit:>6.2f}{n * ROW_BYTES / t_store / 1e9:>12.2f}"
              f"{n * ROW_BYTES / t_numpy / 1e9:>12.2f}{t_numpy / t_store:>13.2f}")
    print("numpy bytes: data[ids], scales[ids] on the mapped uint8 arrays (no dequant); kernel: engram_gather on "
          "the mapped tensors; store: EngramTableStore.lookup, uniform ids, hot cache off; store zipf: Zipf(1.0) "
          "ids, 65,536-row hot cache warmed")
    print()
    print(f"decode through LLMEngine, our architecture (MLA + mHC n=4 + MoE, 4 layers, hidden 256), Engram on 2 "
          f"layers: {info['table_rows']:,} rows, {info['table_mib']:.0f} MiB fp8; {new_tokens} new tokens a request, "
          f"greedy, median of {rounds} interleaved round(s)")
    print(f"{'concurrent':>10}{'in-process':>12}{'service x2':>12}{'no Engram':>11}{'service loss':>14}"
          f"{'Engram cost':>13}")
    for concurrency, local, service, none in decode:
        print(f"{concurrency:>10}{local:>12.1f}{service:>12.1f}{none:>11.1f}{1 - service / local:>14.1%}"
              f"{1 - local / none:>13.1%}")
    print(f"tok/s; service loss = 1 - service/in-process (the Engram paper: 1.9-2.8% with tables in host DRAM); "
          f"Engram cost = 1 - in-process/no Engram (its compute included); service hot-cache hit rate "
          f"{info['hit_rate']:.2f}")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
