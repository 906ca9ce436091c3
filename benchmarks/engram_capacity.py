"""Capacity model for serving DeepSeek-V4.1-Flash-size Engram tables from memory-service nodes.

Prints the tables docs/capacity.md quotes, each from the formulas below (nothing measured here but the
last table, a simulation of our own hot-row cache):

1. Table geometry: V4.1-Flash's Engram values (../shared/reference/MODEL_SPEC.md, "Engram": layers [1, 14],
   max n-gram 4, 8 heads, head_dim 256, engram_vocab_size 16,000,000, e4m3 rows with one e8m0 scale per 32
   values) and the row counts of our own hash layout (`EngramHasher.table_rows`: sum of the primes).
2. Bytes per decode token over the network, and Gbit/s at given aggregate decode rates: FP8 rows (what the
   table stores, and what the workers' direct calls to the row servers carry) and fp32 rows (what the
   Serve-request path, `engram_transport="serve"`, returns).
3. Hot-row cache hit rates under a Zipf(s) row popularity, for an ideal static cache of the K most used
   rows (the bound for any cache of K rows): exact partial sums of k^-s up to 10^6 terms, an integral for
   the rest.
4. Nodes a target decode rate needs: the most of the capacity bound (table bytes / usable DRAM, times
   replicas), the network bound (egress / usable NIC rate) and the gather bound (rows/s / per-node rate).
5. Check of (3) at a scaled-down size: the hit rate of `memory_service.hot_cache.HotRowCache` (windowed,
   aged LFU) on a sampled Zipf stream beside the ideal static cache's on the same stream and the formula.
6. The latency budget: a step's rows depend on the token sampled the step before, so a fetch can overlap only
   the layers below the first Engram layer; the rest of its round trip adds to the step. Decode cost =
   exposed / (step + exposed); the most exposed time a step of a given length allows within the 3% goal.

Every assumption is a named constant or flag with its default printed.

    python benchmarks/engram_capacity.py [--quick] [--zipf 0.8,1.0,1.2] [--nic-gbit 25] [--node-dram-gib 256]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---- V4.1-Flash Engram geometry (MODEL_SPEC.md, "Engram (DeepSeek-V4.1 inference semantics)") ------------
V41_LAYERS = (1, 14)  # engram_layer_ids
V41_MAX_NGRAM = 4  # n-gram sizes 2..4: 3 per head
V41_HEADS = 8
V41_HEAD_DIM = 256
V41_VOCAB = 16_000_000  # engram_vocab_size: each (n-gram size, head) column has a prime just above it
V41_COMPRESSED_VOCAB = 99_092  # compressed tokenizer ids (129,280 -> 99,092)
ID_BYTES = 8  # int64 hash ids sent to the memory service


@dataclass(frozen=True)
class EngramGeometry:
    layers: int
    max_ngram: int
    heads: int
    head_dim: int
    rows_per_layer: tuple[int, ...] = ()

    @property
    def cols(self) -> int:
        """Rows one token reads per Engram layer: (max_ngram - 1) n-gram sizes x heads."""
        return (self.max_ngram - 1) * self.heads

    @property
    def rows_per_token(self) -> int:
        return self.layers * self.cols

    def row_bytes(self, wire: str) -> int:
        """'fp8': e4m3 values + one e8m0 scale per 32 (the table's bytes); 'fp32': dequantized rows."""
        return self.head_dim + self.head_dim // 32 if wire == "fp8" else 4 * self.head_dim

    def bytes_per_token(self, wire: str) -> int:
        """Rows one decode token brings back over the network (ids excluded)."""
        return self.rows_per_token * self.row_bytes(wire)

    @property
    def id_bytes_per_token(self) -> int:
        return self.rows_per_token * ID_BYTES

    @property
    def table_bytes(self) -> int:
        return sum(self.rows_per_layer) * self.row_bytes("fp8")


def v41_flash() -> EngramGeometry:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from model_worker.engram_hashing import EngramHasher

    hasher = EngramHasher(list(V41_LAYERS), V41_MAX_NGRAM, V41_HEADS, V41_VOCAB, V41_COMPRESSED_VOCAB, 0)
    return EngramGeometry(len(V41_LAYERS), V41_MAX_NGRAM, V41_HEADS, V41_HEAD_DIM,
                          tuple(hasher.table_rows(layer) for layer in V41_LAYERS))


# ---- Zipf hit rates ---------------------------------------------------------------------------------------
EXACT_TERMS = 1_000_000


def zipf_partial_sum(n: float, s: float) -> float:
    """sum_{k=1}^{n} k^-s: exact up to EXACT_TERMS, then the midpoint integral of x^-s (error < 1e-12 there)."""
    n = int(n)
    exact = min(n, EXACT_TERMS)
    total = float(np.sum(np.arange(1, exact + 1, dtype=np.float64) ** -s))
    if n > exact:
        lo, hi = exact + 0.5, n + 0.5
        total += math.log(hi / lo) if s == 1.0 else (hi ** (1 - s) - lo ** (1 - s)) / (1 - s)
    return total


def static_hit_rate(cached_per_column: float, rows_per_column: float, s: float) -> float:
    """Share of lookups an ideal cache of a column's `cached_per_column` most used rows serves, when the
    column's rows are used with Zipf(s) popularity (rank k has weight k^-s)."""
    if cached_per_column >= rows_per_column:
        return 1.0
    return zipf_partial_sum(cached_per_column, s) / zipf_partial_sum(rows_per_column, s)


def zipf_stream(rows: int, s: float, n: int, seed: int = 0) -> np.ndarray:
    """n ids over `rows`, Zipf(s) by rank, ranks shuffled over ids."""
    gen = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -s)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, gen.random(n)), rows - 1)
    return gen.permutation(rows)[ranks], ranks


def simulate_hot_cache(rows: int, capacity: int, s: float, batches: int, batch: int) -> tuple[float, float]:
    """(HotRowCache hit rate over the second half of the stream, ideal static top-`capacity` hit rate on the
    same half) for a Zipf(s) stream of `batches` batches of `batch` ids."""
    import torch

    from memory_service.hot_cache import HotRowCache

    ids, ranks = zipf_stream(rows, s, batches * batch)
    cache = HotRowCache(capacity, head_dim=4)

    def fetch(wanted):
        return torch.zeros(len(wanted), 4)

    half = batches // 2
    for i in range(half):  # warm-up half
        cache.lookup(torch.from_numpy(ids[i * batch:(i + 1) * batch]), fetch)
    before = cache.stats()
    for i in range(half, batches):
        cache.lookup(torch.from_numpy(ids[i * batch:(i + 1) * batch]), fetch)
    after = cache.stats()
    looked = (after["hits"] + after["misses"]) - (before["hits"] + before["misses"])
    measured = (after["hits"] - before["hits"]) / max(1, looked)
    ideal = float(np.mean(ranks[half * batch:] < capacity))
    return measured, ideal


# ---- nodes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeAssumptions:
    dram_gib: float  # DRAM a memory-service node gives to tables (assumption)
    nic_gbit: float  # NIC line rate (assumption)
    nic_usable: float  # share of the line rate usable for row traffic (assumption)
    gather_mrows: float  # rows/s one node gathers, dequantizes and serialises (assumption, see --gather-mrows)
    replicas: int  # copies of each shard (2: serve on after losing a node)


def nodes_needed(geo: EngramGeometry, tokens_per_s: float, wire: str, miss_rate: float,
                 node: NodeAssumptions) -> dict[str, int]:
    """Memory-service nodes for `tokens_per_s` of aggregate decode: the most of three bounds. miss_rate: share
    of rows a worker-side hot cache does not serve (1.0: no such cache, as today)."""
    capacity = math.ceil(geo.table_bytes / (node.dram_gib * 2**30)) * node.replicas
    egress = tokens_per_s * geo.bytes_per_token(wire) * miss_rate  # bytes/s
    network = math.ceil(egress / (node.nic_gbit * 1e9 / 8 * node.nic_usable))
    gather = math.ceil(tokens_per_s * geo.rows_per_token * miss_rate / (node.gather_mrows * 1e6))
    return {"capacity": capacity, "network": network, "gather": gather,
            "nodes": max(capacity, network, gather)}


def remote_cost(step_ms: float, exposed_ms: float) -> float:
    """Share of decode throughput lost when every step waits `exposed_ms` more."""
    return exposed_ms / (step_ms + exposed_ms)


def exposed_budget_ms(step_ms: float, goal: float = 0.03) -> float:
    """The most exposed wait per step within `goal`: solves exposed / (step + exposed) = goal."""
    return step_ms * goal / (1 - goal)


# ---- report -----------------------------------------------------------------------------------------------
def gbit(bytes_per_s: float) -> float:
    return bytes_per_s * 8 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller cache simulation (seconds)")
    parser.add_argument("--zipf", default="0.8,1.0,1.2", help="Zipf exponents of row use (assumption)")
    parser.add_argument("--rates", default="1000,10000,100000,1000000", help="aggregate decode tokens/s")
    parser.add_argument("--node-dram-gib", type=float, default=256.0, help="table DRAM per node (assumption)")
    parser.add_argument("--nic-gbit", type=float, default=25.0, help="NIC line rate, Gbit/s (assumption)")
    parser.add_argument("--nic-usable", type=float, default=0.7, help="usable share of the NIC (assumption)")
    parser.add_argument("--gather-mrows", type=float, default=20.0,
                        help="Mrows/s a node gathers, dequantizes and serialises (assumption: a many-core node; "
                             "engram_remote.py measured the shard's lookup at ~3 Mrows/s on one thread here)")
    parser.add_argument("--replicas", type=int, default=2, help="copies of each shard")
    parser.add_argument("--steps-ms", default="15,34,50,100,300", help="decode step times for the latency table")
    parser.add_argument("--exposed-ms", default="0.1,0.5,2,8.4,13.2",
                        help="exposed fetch waits per step (8.4/13.2: lookup RTT / extra step time measured by "
                             "engram_remote.py at concurrency 1 on this loaded host)")
    args = parser.parse_args()
    exponents = [float(x) for x in args.zipf.split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    node = NodeAssumptions(args.node_dram_gib, args.nic_gbit, args.nic_usable, args.gather_mrows, args.replicas)

    geo = v41_flash()
    rows = sum(geo.rows_per_layer)
    per_column = rows / (geo.layers * geo.cols)
    print("1. V4.1-Flash Engram tables (MODEL_SPEC.md values; rows from our hash layout's primes)")
    print(f"   layers {list(V41_LAYERS)}, n-gram sizes 2..{V41_MAX_NGRAM}, {V41_HEADS} heads -> {geo.cols} rows per "
          f"layer per token, {geo.rows_per_token} per token; head_dim {V41_HEAD_DIM}")
    print(f"   rows per layer {', '.join(f'{r:,}' for r in geo.rows_per_layer)} (total {rows:,}; "
          f"{per_column:,.0f} per column)")
    print(f"   row bytes fp8 {geo.row_bytes('fp8')} (e4m3 + e8m0 per 32), fp32 {geo.row_bytes('fp32')}; table "
          f"{geo.table_bytes / 2**30:.2f} GiB fp8 ({geo.table_bytes / 1e9:.1f} GB)")
    print()
    print("2. Bytes per decode token over the network (rows back; ids out are "
          f"{geo.id_bytes_per_token} B/token)")
    print(f"   fp8 rows: {geo.bytes_per_token('fp8'):,} B/token; fp32 rows (the Serve-request "
          f"path): {geo.bytes_per_token('fp32'):,} B/token ({geo.row_bytes('fp32') / geo.row_bytes('fp8'):.2f}x)")
    print(f"   {'tokens/s':>12}{'fp8 Gbit/s':>12}{'fp32 Gbit/s':>13}{'rows/s':>14}")
    for rate in rates:
        print(f"   {rate:>12,.0f}{gbit(rate * geo.bytes_per_token('fp8')):>12.2f}"
              f"{gbit(rate * geo.bytes_per_token('fp32')):>13.2f}{rate * geo.rows_per_token:>14,.0f}")
    print()
    print("3. Ideal hot-row cache hit rate, Zipf(s) row use in every column (assumption), cache split evenly "
          "over the 48 columns")
    fractions = [0.0001, 0.001, 0.01, 0.05, 0.1]
    print(f"   {'cached rows':>14}{'share':>8}{'fp8 GiB':>9}{'fp32 GiB':>10}"
          + "".join(f"{f's={s:g}':>8}" for s in exponents))
    hits = {}
    for fraction in fractions:
        cached = rows * fraction
        rates_s = [static_hit_rate(per_column * fraction, per_column, s) for s in exponents]
        hits[fraction] = dict(zip(exponents, rates_s))
        print(f"   {cached:>14,.0f}{fraction:>8.2%}{cached * geo.row_bytes('fp8') / 2**30:>9.2f}"
              f"{cached * geo.row_bytes('fp32') / 2**30:>10.2f}" + "".join(f"{h:>8.3f}" for h in rates_s))
    print()
    print(f"4. Memory-service nodes for an aggregate decode rate: {node.dram_gib:g} GiB table DRAM per node, "
          f"{node.replicas} replicas of each shard, {node.nic_gbit:g} Gbit/s NIC at {node.nic_usable:.0%}, "
          f"{node.gather_mrows:g} Mrows/s gather per node (all assumptions)")
    s_mid = 1.0 if 1.0 in exponents else exponents[len(exponents) // 2]
    miss = 1 - hits[0.01][s_mid]
    print(f"   {'tokens/s':>12}{'wire':>6}{'worker cache':>14}{'capacity':>10}{'network':>9}{'gather':>8}"
          f"{'nodes':>7}")
    for rate in rates:
        for wire, cache_label, miss_rate in (("fp32", "none", 1.0), ("fp8", "none", 1.0),
                                             ("fp8", f"1% s={s_mid:g}", miss)):
            need = nodes_needed(geo, rate, wire, miss_rate, node)
            print(f"   {rate:>12,.0f}{wire:>6}{cache_label:>14}{need['capacity']:>10}{need['network']:>9}"
                  f"{need['gather']:>8}{need['nodes']:>7}")
    print()
    sim_rows, batches = (200_000, 400) if args.quick else (1_000_000, 2000)
    batch = 24 * 16  # one layer's ids of a 16-request decode step at V4.1's 24 columns
    print(f"5. Check of (3) at a scaled-down size: {sim_rows:,} rows, cache of 1% of them, {batches} batches of "
          f"{batch} Zipf ids (hit rates over the second half)")
    print(f"   {'s':>6}{'formula':>9}{'ideal (sampled)':>17}{'HotRowCache':>13}{'of ideal':>10}")
    for s in exponents:
        measured, ideal = simulate_hot_cache(sim_rows, sim_rows // 100, s, batches, batch)
        print(f"   {s:>6g}{static_hit_rate(sim_rows // 100, sim_rows, s):>9.3f}{ideal:>17.3f}{measured:>13.3f}"
              f"{measured / ideal:>10.2f}")
    print()
    steps = [float(x) for x in args.steps_ms.split(",")]
    waits = [float(x) for x in args.exposed_ms.split(",")]
    print("6. Decode cost of a remote fetch that is not hidden: exposed / (step + exposed); budget = the most "
          "exposed ms within 3%")
    print(f"   {'step ms':>8}{'budget ms':>11}" + "".join(f"{f'{w:g} ms':>10}" for w in waits))
    for step in steps:
        print(f"   {step:>8g}{exposed_budget_ms(step):>11.2f}"
              + "".join(f"{remote_cost(step, w):>10.1%}" for w in waits))


if __name__ == "__main__":
    main()
