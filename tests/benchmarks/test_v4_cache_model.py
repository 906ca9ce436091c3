"""benchmarks/v4_cache_model.py's arithmetic (kv_capacity.py's V3/V4 table) against sums worked by hand from
the two cache layouts."""

from __future__ import annotations

import pytest

from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def kv():
    return load_script("v4_cache_model")


def test_v3_is_656_bytes_per_token_per_layer(kv):
    v3 = kv.V3Cache(layers=61, kv_lora_rank=512, rope_dim=64)
    assert v3.row_bytes == 512 + 4 * 4 + 2 * 64 == 656
    assert v3.bytes_per_sequence(8192) == {"latent rows": 61 * 8192 * 656}
    assert v3.bytes_per_sequence(100)["latent rows"] == 61 * 128 * 656  # two pages of 64


def test_v4_layer_kinds_by_hand(kv):
    v4 = kv.V4Cache(("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"),
                    head_dim=512, rope_dim=64, window=128,
                    rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}, index_head_dim=128)
    page = 65 * 576  # 64 tokens x 584 B padded to a multiple of 576 B
    parts = v4.bytes_per_sequence(8192)
    assert parts["sliding window"] == 3 * 3 * page  # 128 tokens spanning up to 3 pages, on each of 3 layers
    assert parts["compressed entries"] == (2048 // 64) * page + (64 // 64) * page  # CSA 8192/4, HCA 8192/128
    assert parts["indexer keys"] == 2048 * (128 + 4)
    assert parts["open windows"] == 3 * 2 * 2 * 512 * 2 + 127 * 2 * 512 * 2  # CSA (overlap x2), HCA; bf16


def test_transformers_defaults_give_v4_more_tokens_than_v3(kv):
    from transformers import DeepseekV3Config

    v3, v4 = kv.V3Cache.from_config(DeepseekV3Config().to_dict()), kv.V4Cache.from_config(kv.v4_config(None))
    assert len(v4.layer_types) == 43 and v4.layout.bytes_per_token == 584
    rows = kv.capacity_rows(v3, v4, 64 * 2**30)
    for short, long in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert long["tokens"] > 5 * short["tokens"]
