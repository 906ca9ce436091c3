"""Engram hash and gather kernels: torch references and Triton (interpreter on CPU) against the shipped
vectors, a literal per-position transcription of the hash, and bit-level FP8 decoding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engram_kernels.engram import (
    engram_gather,
    engram_gather_ref,
    engram_gather_triton,
    engram_hash,
    engram_hash_ref,
    engram_hash_triton,
)

VECTORS = Path(__file__).resolve().parents[1] / "data/engram_hash_vectors.json"  # reference vectors, copied
HASH_IMPLS = [engram_hash_ref, engram_hash_triton]
GATHER_IMPLS = [engram_gather_ref, engram_gather_triton]
INT64_MOD = 1 << 64


def _vector_cases() -> list[dict]:
    return json.loads(VECTORS.read_text())["cases"]


def _offsets(primes: torch.Tensor) -> torch.Tensor:
    """Running sum of primes, starting at 0."""
    return torch.tensor([sum(primes.tolist()[:i]) for i in range(primes.numel())], dtype=torch.int64)


def _wrap64(x: int) -> int:
    x %= INT64_MOD
    return x - INT64_MOD if x >= 1 << 63 else x


def _spec_hash_row(ids: list[int], valid: list[bool], m: list[int], primes: list[int], offsets: list[int],
                   pad: int) -> list[list[int]]:
    """The spec, position by position, with Python ints (wrapped to int64 after each product)."""
    n_heads = len(primes) // (len(m) - 1)
    out = []
    for t in range(len(ids)):
        tokens, blocked = [], False
        for s in range(len(m)):
            blocked = blocked or t - s < 0 or not valid[t - s]
            tokens.append(pad if blocked else ids[t - s])
        rolling = _wrap64(tokens[0] * m[0])
        row = []
        for i in range(1, len(m)):
            rolling ^= _wrap64(tokens[i] * m[i])
            for h in range(n_heads):
                col = (i - 1) * n_heads + h
                row.append(rolling % primes[col] + offsets[col])
        out.append(row)
    return out


def _random_hash_params(max_ngram: int, n_heads: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    multipliers = torch.randint(0, 2**62, (max_ngram,), generator=g, dtype=torch.int64) * 2 + 1
    primes = torch.tensor([101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167, 173])
    primes = primes[: (max_ngram - 1) * n_heads]
    return multipliers, primes, _offsets(primes)


@pytest.mark.parametrize("impl", HASH_IMPLS, ids=lambda f: f.__name__)
def test_hash_ids_equal_shipped_vectors(impl):
    for case in _vector_cases():
        ids = torch.tensor([case["compressed_ids"]], dtype=torch.int64)  # [1, T]
        for layer_index in range(len(case["layer_ids"])):
            primes = torch.tensor(case["primes"][layer_index], dtype=torch.int64).reshape(-1)
            multipliers = torch.tensor(case["multipliers"][layer_index], dtype=torch.int64)
            out = impl(ids, multipliers, primes, _offsets(primes), case["pad_compressed_id"])
            assert out.dtype == torch.int64
            assert out[0].tolist() == case["hash_ids"][layer_index]


@pytest.mark.parametrize("impl", HASH_IMPLS, ids=lambda f: f.__name__)
def test_left_padding_equals_hashing_each_unpadded_sequence(impl):
    multipliers, primes, offsets = _random_hash_params(max_ngram=4, n_heads=3, seed=1)
    lengths = [7, 2, 5]
    seq_len = max(lengths)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1000, (len(lengths), seq_len), generator=g)  # padding slots hold junk ids
    valid = torch.arange(seq_len)[None, :] >= torch.tensor([seq_len - n for n in lengths])[:, None]
    out = impl(ids, multipliers, primes, offsets, 3, valid_mask=valid)
    for b, n in enumerate(lengths):
        alone = impl(ids[b : b + 1, seq_len - n :].contiguous(), multipliers, primes, offsets, 3)
        assert torch.equal(out[b, seq_len - n :], alone[0])


@pytest.mark.parametrize("impl", HASH_IMPLS, ids=lambda f: f.__name__)
def test_hash_follows_spec_with_int64_wraparound_and_sticky_masks(impl):
    # Ids far beyond any vocabulary make the products overflow int64 and the XOR go negative.
    multipliers, primes, offsets = _random_hash_params(max_ngram=3, n_heads=4, seed=3)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 2**40, (2, 9), generator=g)
    valid = torch.rand(2, 9, generator=g) > 0.3  # holes in the middle, not only left padding
    out = impl(ids, multipliers, primes, offsets, 5, valid_mask=valid)
    for b in range(2):
        want = _spec_hash_row(ids[b].tolist(), valid[b].tolist(), multipliers.tolist(), primes.tolist(),
                              offsets.tolist(), 5)
        assert out[b].tolist() == want
    assert (out >= 0).all()


def test_hash_triton_matches_reference_on_random_inputs():
    multipliers, primes, offsets = _random_hash_params(max_ngram=4, n_heads=2, seed=5)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 50_000, (3, 150), generator=g)  # T > one 128-position block
    valid = torch.rand(3, 150, generator=g) > 0.1
    for mask in (None, valid):
        ref = engram_hash_ref(ids, multipliers, primes, offsets, 2, mask)
        assert torch.equal(engram_hash_triton(ids, multipliers, primes, offsets, 2, mask), ref)
        assert torch.equal(engram_hash(ids, multipliers, primes, offsets, 2, mask), ref)


@pytest.mark.parametrize("impl", HASH_IMPLS, ids=lambda f: f.__name__)
def test_hash_rejects_bad_arguments(impl):
    multipliers, primes, offsets = _random_hash_params(max_ngram=3, n_heads=2, seed=7)
    ids = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match="compressed_ids"):
        impl(ids.int(), multipliers, primes, offsets, 0)
    with pytest.raises(ValueError, match="compressed_ids"):
        impl(ids[0], multipliers, primes, offsets, 0)
    with pytest.raises(ValueError, match="primes"):
        impl(ids, multipliers, primes[:3], offsets[:3], 0)
    with pytest.raises(ValueError, match="offsets"):
        impl(ids, multipliers, primes, offsets[:2], 0)
    with pytest.raises(TypeError, match="valid_mask"):
        impl(ids, multipliers, primes, offsets, 0, valid_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="valid_mask"):
        impl(ids, multipliers, primes, offsets, 0, valid_mask=torch.ones(1, 3, dtype=torch.bool))


def _decode_e4m3(byte: int) -> float:
    """float8_e4m3fn from its bits: 1 sign, 4 exponent (bias 7), 3 mantissa; no infinities."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0:
        return sign * math.ldexp(mantissa / 8, -6)
    return sign * math.ldexp(1 + mantissa / 8, exponent - 7)


def _fp8_table(
    rows: int, dim: int, seed: int, exponents: tuple[int, int] = (0, 255)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 codes (no NaN codes) and e8m0 scale bytes drawn from [exponents[0], exponents[1])."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, dim), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x10  # drop the two NaN codes
    scale_bytes = torch.randint(*exponents, (rows, dim // 32), generator=g, dtype=torch.uint8)
    return codes.view(torch.float8_e4m3fn), scale_bytes.view(torch.float8_e8m0fnu)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter, on the inf rows
@pytest.mark.parametrize("impl", GATHER_IMPLS, ids=lambda f: f.__name__)
def test_fp8_rows_dequantize_as_block_times_power_of_two(impl):
    table, scales = _fp8_table(rows=6, dim=64, seed=8)
    edge = torch.tensor([[0, 254], [1, 127], [253, 126]], dtype=torch.uint8)  # subnormal 2^-127 .. overflow
    scales.view(torch.uint8)[:3] = edge
    ids = torch.tensor([[5, 0, 5], [2, 3, 1]])
    out = impl(table, scales, ids)
    assert out.shape == (2, 3, 64) and out.dtype == torch.float32
    codes, exps = table.view(torch.uint8), scales.view(torch.uint8)
    for idx, row in zip(ids.reshape(-1).tolist(), out.reshape(-1, 64), strict=True):
        exact = [_decode_e4m3(int(codes[idx, d])) * 2.0 ** (int(exps[idx, d // 32]) - 127) for d in range(64)]
        # e4m3 * 2^k is exact in float64; fp32 rounds only where it leaves fp32 range (inf, subnormals)
        assert torch.equal(row, torch.tensor(exact, dtype=torch.float64).float())


@pytest.mark.parametrize("impl", GATHER_IMPLS, ids=lambda f: f.__name__)
def test_e8m0_all_ones_scale_is_nan(impl):
    table = torch.ones(2, 32).to(torch.float8_e4m3fn)
    scales = torch.tensor([[127], [255]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    out = impl(table, scales, torch.tensor([0, 1]))
    assert torch.equal(out[0], torch.ones(32)) and out[1].isnan().all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", ["fp8", torch.bfloat16, torch.float32])
def test_gather_triton_matches_reference(table_dtype, out_dtype):
    g = torch.Generator().manual_seed(9)
    if table_dtype == "fp8":
        table, scales = _fp8_table(rows=40, dim=96, seed=10, exponents=(100, 150))  # 96: not a power of 2
    else:
        table, scales = torch.randn(40, 96, generator=g).to(table_dtype), None
    ids = torch.randint(0, 40, (3, 7), generator=g)
    ref = engram_gather_ref(table, scales, ids, out_dtype)
    assert ref.dtype == out_dtype and ref.shape == (3, 7, 96)
    out = engram_gather_triton(table, scales, ids, out_dtype)
    if table_dtype == torch.float32 and out_dtype == torch.bfloat16 and not table.is_cuda:
        # The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: allow one bf16 step.
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, ref)
    assert torch.equal(engram_gather(table, scales, ids, out_dtype), ref)


@pytest.mark.parametrize("impl", GATHER_IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32])
def test_plain_tables_gather_rows_unchanged(impl, table_dtype):
    table = torch.randn(10, 16, generator=torch.Generator().manual_seed(11)).to(table_dtype)
    ids = torch.tensor([9, 0, 4, 4])
    assert torch.equal(impl(table, None, ids), table.float()[[9, 0, 4, 4]])


@pytest.mark.parametrize("impl", GATHER_IMPLS, ids=lambda f: f.__name__)
def test_gather_rejects_out_of_range_ids_and_bad_tables(impl):
    table, scales = _fp8_table(rows=4, dim=32, seed=12)
    for bad in ([0, 4], [-1, 2]):
        with pytest.raises(ValueError, match="ids"):
            impl(table, scales, torch.tensor(bad))
    with pytest.raises(ValueError, match="scales"):
        impl(table, None, torch.tensor([0]))
    with pytest.raises(TypeError, match="scales"):
        impl(table, scales.view(torch.uint8), torch.tensor([0]))
    with pytest.raises(ValueError, match="scales"):
        impl(table, scales[:3], torch.tensor([0]))
    with pytest.raises(TypeError, match="ids"):
        impl(table, scales, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="scales"):
        impl(torch.zeros(4, 32), scales, torch.tensor([0]))
    with pytest.raises(TypeError, match="table"):
        impl(torch.zeros(4, 32, dtype=torch.int8), None, torch.tensor([0]))
