"""The capacity model's arithmetic (benchmarks/engram_capacity.py, quoted by docs/capacity.md) against hand
computations and brute-force sums, so the doc's numbers rest on checked formulas."""

from __future__ import annotations

import numpy as np
import pytest

from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def capacity():
    return load_script("engram_capacity")


def test_v41_bytes_per_token_match_hand_computation(capacity):
    geo = capacity.EngramGeometry(layers=2, max_ngram=4, heads=8, head_dim=256)
    # 2 layers x 3 n-gram sizes x 8 heads = 48 rows; fp8 row = 256 e4m3 bytes + 256/32 e8m0 scales = 264 B
    assert geo.rows_per_token == 48
    assert geo.bytes_per_token("fp8") == 48 * 264 == 12_672
    assert geo.bytes_per_token("fp32") == 48 * 1024 == 49_152
    assert geo.id_bytes_per_token == 48 * 8


def test_v41_table_is_about_189_gib(capacity):
    geo = capacity.v41_flash()
    # each layer: 24 columns of one prime just above 16,000,000 rows
    assert all(24 * 16_000_000 < rows < 24 * 16_001_000 for rows in geo.rows_per_layer)
    assert geo.table_bytes == sum(geo.rows_per_layer) * 264
    assert 188.5 < geo.table_bytes / 2**30 < 189.5  # MODEL_SPEC.md: "about 189 GiB in all"


@pytest.mark.parametrize("s", [0.8, 1.0, 1.2])
def test_zipf_partial_sum_matches_brute_force_beyond_exact_terms(capacity, s):
    n = 3 * capacity.EXACT_TERMS + 17  # well into the integral tail
    brute = float(np.sum(np.arange(1, n + 1, dtype=np.float64) ** -s))
    assert capacity.zipf_partial_sum(n, s) == pytest.approx(brute, rel=1e-9)


def test_static_hit_rate_is_the_head_share(capacity):
    ranks = np.arange(1, 1001, dtype=np.float64)
    want = float(np.sum(ranks[:10] ** -1.0) / np.sum(ranks ** -1.0))
    assert capacity.static_hit_rate(10, 1000, 1.0) == pytest.approx(want, rel=1e-12)
    assert capacity.static_hit_rate(1000, 1000, 1.0) == 1.0


def test_nodes_and_latency_budget(capacity):
    geo = capacity.EngramGeometry(2, 4, 8, 256, rows_per_layer=(384_000_000, 384_000_000))
    node = capacity.NodeAssumptions(dram_gib=256, nic_gbit=25, nic_usable=0.7, gather_mrows=20, replicas=2)
    need = capacity.nodes_needed(geo, 1_000_000, "fp8", 1.0, node)
    # 768M rows x 264 B = 188.8 GiB -> 1 node of 256 GiB, x2 replicas
    assert need["capacity"] == 2
    # 1M tok/s x 12,672 B = 12.672 GB/s over 25e9/8 x 0.7 = 2.1875 GB/s per node -> 5.79 -> 6
    assert need["network"] == 6
    # 48M rows/s over 20M rows/s per node -> 3
    assert need["gather"] == 3 and need["nodes"] == 6
    assert capacity.remote_cost(97.0, 3.0) == pytest.approx(0.03)
    assert capacity.exposed_budget_ms(97.0) == pytest.approx(3.0)
