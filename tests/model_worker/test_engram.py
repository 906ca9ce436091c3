"""Engram hashing parameters, the hasher, in-process tables and the Engram module, against the shipped
hash vectors, the quantization formula and a literal transcription of the module's formula."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model_worker.engram_hashing import EngramHasher, engram_multipliers, engram_primes
from model_worker.engram_tables import EngramTable, InProcessEngramTables, quantize_e4m3_blocks
from model_worker.layers.engram import EngramModule

VECTORS = Path(__file__).resolve().parents[1] / "data/engram_hash_vectors.json"  # reference vectors, copied


def _vector_cases() -> list[dict]:
    return json.loads(VECTORS.read_text())["cases"]


def _hasher(case: dict) -> EngramHasher:
    return EngramHasher(case["layer_ids"], case["max_ngram_size"], case["n_heads"], case["engram_vocab_size"],
                        case["compressed_vocab_size"], case["pad_compressed_id"])


# ---------------------------------------------------------------------------------------------- hashing


def test_multipliers_and_primes_equal_shipped_vectors():
    for case in _vector_cases():
        sizes = (case["max_ngram_size"], case["n_heads"], case["engram_vocab_size"])
        primes = engram_primes(case["layer_ids"], *sizes)
        assert list(primes) == case["layer_ids"]
        for i, layer in enumerate(case["layer_ids"]):
            m = engram_multipliers(layer, case["compressed_vocab_size"], case["max_ngram_size"])
            assert m.dtype == np.int64 and m.tolist() == case["multipliers"][i]
            assert primes[layer].dtype == np.int64 and primes[layer].tolist() == case["primes"][i]


def test_hasher_ids_equal_shipped_vectors_and_fit_the_table():
    for case in _vector_cases():
        hasher = _hasher(case)
        assert hasher.n_hash_cols == (case["max_ngram_size"] - 1) * case["n_heads"]
        ids = torch.tensor([case["compressed_ids"]])
        for i, layer in enumerate(case["layer_ids"]):
            out = hasher.hash(layer, ids)
            assert out[0].tolist() == case["hash_ids"][i]
            assert hasher.table_rows(layer) == sum(sum(row) for row in case["primes"][i])
            assert int(out.max()) < hasher.table_rows(layer)


def test_hasher_batch_with_left_padding_equals_each_sequence_alone():
    case = _vector_cases()[1]
    hasher = _hasher(case)
    seqs = [case["compressed_ids"], case["compressed_ids"][3:], case["compressed_ids"][:2]]
    seq_len = max(map(len, seqs))
    ids = torch.full((len(seqs), seq_len), 777)  # junk in padding slots
    valid = torch.zeros(len(seqs), seq_len, dtype=torch.bool)
    for b, seq in enumerate(seqs):
        ids[b, seq_len - len(seq) :] = torch.tensor(seq)
        valid[b, seq_len - len(seq) :] = True
    layer = case["layer_ids"][1]
    out = hasher.hash(layer, ids, valid)
    for b, seq in enumerate(seqs):
        assert torch.equal(out[b, seq_len - len(seq) :], hasher.hash(layer, torch.tensor([seq]))[0])


def test_primes_are_distinct_primes_above_the_vocab_across_layers():
    primes = engram_primes([2, 0, 5], max_ngram_size=3, n_heads=4, engram_vocab_size=90)
    flat = np.concatenate([p.reshape(-1) for p in primes.values()]).tolist()
    assert len(set(flat)) == len(flat) and min(flat) >= 90
    assert all(all(p % f for f in range(2, math.isqrt(p) + 1)) for p in flat)
    assert primes[2].shape == (2, 4)


def test_hashing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layer_ids"):
        engram_primes([1, 1], 3, 2, 100)
    with pytest.raises(ValueError, match="max_ngram_size"):
        engram_multipliers(1, 1000, 1)
    hasher = EngramHasher([1], 3, 2, 100, 1000, pad_id=2)
    with pytest.raises(ValueError, match="layer_id"):
        hasher.hash(4, torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="compressed_ids"):
        hasher.hash(1, torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="pad_id"):
        EngramHasher([1], 3, 2, 100, 1000, pad_id=1000)


# ----------------------------------------------------------------------------------------------- tables


def test_fp8_quantization_uses_ceil_log2_power_of_two_scales():
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 64, generator=g) * torch.tensor([1e-7, 1.0, 3e3])[:, None]  # tiny, unit, large
    weights[1, :32] *= 448 / weights[1, :32].abs().max()  # amax exactly 448 -> scale 2^0
    data, scales = quantize_e4m3_blocks(weights)
    assert data.dtype == torch.float8_e4m3fn and data.shape == (3, 64)
    assert scales.dtype == torch.float8_e8m0fnu and scales.shape == (3, 2)
    for r in range(3):
        for blk in range(2):
            amax = float(weights[r, blk * 32 : (blk + 1) * 32].abs().max())
            exponent = math.ceil(math.log2(max(amax, 1e-4) / 448))
            assert int(scales.view(torch.uint8)[r, blk]) == exponent + 127
    assert int(scales.view(torch.uint8)[1, 0]) == 127
    dequant = EngramTable(data, scales).dequantize()
    # e4m3 keeps 3 mantissa bits: |error| <= 2^-4 of the value, or half a subnormal step near zero
    step = torch.exp2(scales.view(torch.uint8).float() - 127).repeat_interleave(32, dim=1) * 2.0**-10
    assert ((dequant - weights).abs() <= weights.abs() * 2.0**-4 + step).all()


@pytest.mark.parametrize("fmt", ["fp8", "bfloat16", "float32"])
def test_table_lookup_returns_fp32_rows_of_the_stored_format(fmt):
    table = EngramTable.random(rows=20, head_dim=64, dtype=fmt, seed=3)
    assert table.fmt == fmt and (table.rows, table.head_dim) == (20, 64)
    assert (table.scales is not None) == (fmt == "fp8")
    ids = torch.tensor([[19, 0], [7, 7]])
    rows = table.lookup(ids)
    assert rows.dtype == torch.float32 and rows.shape == (2, 2, 64)
    if fmt == "fp8":
        want = table.data.float() * table.scales.float().repeat_interleave(32, dim=1)
    else:
        want = table.data.float()
    assert torch.equal(rows, want[ids])
    assert torch.equal(EngramTable.random(20, 64, fmt, seed=3).data.float(), table.data.float())
    assert not torch.equal(EngramTable.random(20, 64, fmt, seed=4).data.float(), table.data.float())


def test_in_process_tables_round_trip_through_state_dict_items():
    tables = InProcessEngramTables({
        14: EngramTable.random(30, 32, "fp8", seed=1),
        1: EngramTable.random(25, 32, "bfloat16", seed=2),
    })
    items = dict(tables.state_dict_items())
    assert sorted(items) == ["engram.1.table", "engram.14.scales", "engram.14.table"]
    restored = InProcessEngramTables.from_tensors(items)
    assert restored.layer_ids == [1, 14]
    ids = torch.tensor([[0, 24, 3]])
    for layer in (1, 14):
        assert torch.equal(restored.lookup(layer, ids), tables.lookup(layer, ids))
    with pytest.raises(ValueError, match="layer_id"):
        tables.lookup(2, ids)
    with pytest.raises(ValueError, match="tensors"):
        InProcessEngramTables.from_tensors({"engram.1.weight": items["engram.1.table"]})
    with pytest.raises(ValueError, match="tensors"):
        InProcessEngramTables.from_tensors({"engram.14.scales": items["engram.14.scales"]})


def test_tables_reject_bad_data():
    with pytest.raises(ValueError, match="scales"):
        EngramTable(torch.zeros(4, 32).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="scales"):
        EngramTable(torch.zeros(4, 32), torch.zeros(4, 1).to(torch.float8_e8m0fnu))
    with pytest.raises(ValueError, match="fmt"):
        EngramTable.from_float(torch.zeros(4, 32), "int8")
    with pytest.raises(ValueError, match="weights"):
        quantize_e4m3_blocks(torch.zeros(4, 33))
    with pytest.raises(ValueError, match="ids"):
        EngramTable.random(4, 32, seed=0).lookup(torch.tensor([4]))


# ----------------------------------------------------------------------------------------------- module


def _literal_engram(module: EngramModule, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The spec formula, one (b, t, stream) at a time, in float64."""
    module, h, e = module.requires_grad_(False), h.detach(), e.detach()
    n, dim, eps = module.hc_mult, module.hidden_size, module.norm_eps
    wkv = module.wkv.weight.double()
    w = (module.q_weight * module.k_weight).double()
    out = torch.empty(h.shape, dtype=torch.float64)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            kv = wkv @ e[b, t].double()
            value = kv[n * dim :]
            for k in range(n):
                key = kv[k * dim : (k + 1) * dim]
                hk = h[b, t, k].double()
                dot = float((hk * w[k] * key).sum())
                dot *= 1 / math.sqrt(float((hk**2).mean()) + eps) / math.sqrt(float((key**2).mean()) + eps)
                dot /= math.sqrt(dim)
                sign = (dot > 0) - (dot < 0)
                gate = 1 / (1 + math.exp(-sign * math.sqrt(max(abs(dot), 1e-6))))
                out[b, t, k] = hk + gate * value
    return out


def _module_and_inputs(seed: int) -> tuple[EngramModule, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    module = EngramModule(hidden_size=16, hc_mult=3, n_hash_cols=4, head_dim=8)
    with torch.no_grad():
        module.q_weight.normal_()
        module.k_weight.normal_()
    return module, torch.randn(2, 3, 3, 16), torch.randn(2, 3, 4 * 8)


def test_module_matches_literal_formula():
    module, h, e = _module_and_inputs(seed=0)
    out = module(h, e)
    assert out.shape == h.shape and out.dtype == h.dtype
    torch.testing.assert_close(out.double(), _literal_engram(module, h, e), rtol=1e-5, atol=1e-5)


def test_gate_is_one_half_where_dot_is_zero_and_floored_near_zero():
    module, h, e = _module_and_inputs(seed=1)
    module.requires_grad_(False)
    kv = e @ module.wkv.weight.T
    key = kv[..., : 3 * 16].unflatten(-1, (3, 16))  # [B, T, n, D]
    value = kv[..., 3 * 16 :][:, :, None, :]  # [B, T, 1, D]
    module.q_weight.zero_()
    torch.testing.assert_close(module(h, e), h + 0.5 * value, rtol=0, atol=1e-6)
    module.q_weight.fill_(1e-20)  # |dot| << 1e-6, so gate = sigmoid(sign(dot) * sqrt(1e-6))
    sign = torch.sign((h * module.k_weight * key).sum(-1, keepdim=True))  # [B, T, n, 1]
    torch.testing.assert_close(module(h, e), h + torch.sigmoid(sign * 1e-3) * value, rtol=0, atol=1e-5)


def test_module_rejects_mismatched_shapes():
    module, h, e = _module_and_inputs(seed=2)
    with pytest.raises(ValueError, match="h"):
        module(h[:, :, :2], e)
    with pytest.raises(ValueError, match="e"):
        module(h, e[..., :-1])
