"""DeepSeek-V4 decode ops: the references against float64 computations written out here (an explicit loop
for the indexer, a full softmax with the sink concatenated for attention), and the Triton kernels (run by
the interpreter on CPU) against the references, for fp32 and bf16 inputs, ragged valid counts, a row with
no selected entries, and slots that must never be read holding NaN."""

from __future__ import annotations

import pytest
import torch

from engram_kernels.v4_decode import (
    indexer_scores,
    indexer_scores_ref,
    indexer_scores_triton,
    indexer_topk,
    indexer_topk_ref,
    indexer_topk_triton,
    sparse_decode_attention,
    sparse_decode_attention_ref,
    sparse_decode_attention_triton,
)

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
NAN = float("nan")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 results agree to 1e-5; bf16 outputs to bf16 rounding (assert_close's bf16 defaults)."""
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got, want.to(torch.bfloat16))
    else:
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Lightning indexer

def _indexer_case(batch, heads, dim, total, counts, dtype=torch.float32, seed=0, positive_weights=False):
    """q [B, hI, dI] and keys [B, T, dI] in dtype (key rows past each count hold NaN), weights [B, hI] fp32
    (mixed signs unless positive_weights), visible_count int32 [B]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    keys = torch.randn(batch, total, dim, generator=g).to(dtype)
    for b, n in enumerate(counts):
        keys[b, n:] = NAN
    weights = torch.randn(batch, heads, generator=g) * heads**-0.5
    if positive_weights:
        weights = weights.abs() + 0.1
    return q, weights, keys, torch.tensor(counts, dtype=torch.int32)


def _indexer_f64(q, weights, keys, counts, scale, relu=True) -> torch.Tensor:
    """score[b, t] = scale * sum_h w[b, h] * relu(q[b, h] . keys[b, t]) one term at a time; -inf past the count."""
    batch, heads, _ = q.shape
    out = torch.full(keys.shape[:2], float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for t in range(int(counts[b])):
            total = 0.0
            for h in range(heads):
                dot = float(q[b, h].double() @ keys[b, t].double())
                total += float(weights[b, h]) * (max(dot, 0.0) if relu else dot)
            out[b, t] = total * scale
    return out


INDEXER_SHAPES = pytest.mark.parametrize(
    "batch,heads,dim,total,counts",
    [(3, 4, 64, 12, (12, 5, 0)), (2, 3, 24, 7, (1, 7)), (1, 8, 128, 9, (9,))],
    ids=["b3_ragged", "odd_dims", "di128"],
)


@DTYPES
@INDEXER_SHAPES
def test_indexer_reference_equals_float64_loop(dtype, batch, heads, dim, total, counts):
    q, weights, keys, count = _indexer_case(batch, heads, dim, total, counts, dtype, seed=1)
    got = indexer_scores_ref(q, weights, keys, count, dim**-0.5)
    assert got.dtype == torch.float32 and got.shape == (batch, total)
    want = _indexer_f64(q, weights, keys, count, dim**-0.5)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)  # -inf exactly past each count
    # The data can tell: without the ReLU the visible scores differ.
    no_relu = _indexer_f64(q, weights, keys, count, dim**-0.5, relu=False)
    visible = torch.isfinite(want)
    assert (no_relu[visible] - want[visible]).abs().max() > 1e-2


@DTYPES
@INDEXER_SHAPES
def test_indexer_triton_matches_reference(dtype, batch, heads, dim, total, counts):
    for seed in (2, 3):
        q, weights, keys, count = _indexer_case(batch, heads, dim, total, counts, dtype, seed=seed)
        want = indexer_scores_ref(q, weights, keys, count, dim**-0.5)
        got = indexer_scores_triton(q, weights, keys, count, dim**-0.5)
        assert got.dtype == torch.float32 and got.shape == (batch, total)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", [indexer_topk_ref, indexer_topk_triton], ids=["ref", "triton"])
@DTYPES
@pytest.mark.parametrize("k", [4, 8, 16])
def test_indexer_topk_keeps_the_best_visible_entries_and_pads_with_minus_one(impl, dtype, k):
    """k below, between and above the counts (12, 5, 0), and above T = 12 (output is still [B, k])."""
    q, weights, keys, count = _indexer_case(3, 8, 32, 12, (12, 5, 0), dtype, seed=4, positive_weights=True)
    scores = _indexer_f64(q, weights, keys, count, 32**-0.5)
    for b, n in enumerate(count.tolist()):  # no near-ties, so the order is unambiguous
        assert n < 2 or scores[b, :n].sort().values.diff().min() > 1e-4
    got = impl(q, weights, keys, count, k, 32**-0.5)
    assert got.dtype == torch.int64 and got.shape == (3, k)
    for b, n in enumerate(count.tolist()):
        best = scores[b, :n].argsort(descending=True)[:k].tolist()
        assert got[b].tolist() == best + [-1] * (k - len(best))


# ---------------------------------------------------------------------------------------------------
# Sparse decode attention

def _attention_case(batch, heads, dim, width, total, counts, picks, slots, dtype=torch.float32, seed=0,
                    garbage=NAN):
    """q [B, H, D], sliding [B, W, D], entries [B, T, D] in dtype; sliding_count int32 [B]; entry_index int64
    [B, slots] holding picks[b] at shuffled positions, -1 elsewhere; sinks [H] fp32. Sliding rows past each
    count and entry rows no slot picks hold `garbage` (NaN: they must never be read)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=g)
    sliding = torch.randn(batch, width, dim, generator=g)
    entries = torch.randn(batch, total, dim, generator=g)
    index = torch.full((batch, slots), -1, dtype=torch.int64)
    for b, (n, row) in enumerate(zip(counts, picks)):
        where = torch.randperm(slots, generator=g)[: len(row)]
        index[b, where] = torch.tensor(row, dtype=torch.int64)
        sliding[b, n:] = garbage
        unpicked = torch.ones(total, dtype=torch.bool)
        unpicked[list(row)] = False
        entries[b, unpicked] = garbage
    sinks = torch.randn(heads, generator=g) * 2
    return q.to(dtype), sliding.to(dtype), torch.tensor(counts, dtype=torch.int32), entries.to(dtype), index, sinks


def _attention_f64(q, sliding, count, entries, index, sinks, scale, with_sink=True, window=None) -> torch.Tensor:
    """Per sequence: its keys (sliding rows 0..count-1, or 0..window-1, then picked entries), logits with the
    sink concatenated, one full softmax, the sink's probability dropped, then the values. -> [B, H, D] f64."""
    batch, heads, dim = q.shape
    out = torch.zeros(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = int(count[b]) if window is None else window
        rows = [sliding[b, j] for j in range(n)] + [entries[b, i] for i in index[b].tolist() if i >= 0]
        kv = torch.stack(rows).double() if rows else torch.zeros(0, dim, dtype=torch.float64)
        for h in range(heads):
            logits = kv @ q[b, h].double() * scale  # [L]
            if with_sink:
                logits = torch.cat((logits, sinks[h].double().reshape(1)))
            probs = torch.softmax(logits, dim=0)[: len(rows)]
            out[b, h] = probs @ kv
    return out


ATTENTION_SHAPES = pytest.mark.parametrize(
    "batch,heads,dim,width,total,counts,picks,slots",
    [
        (3, 4, 64, 16, 12, (16, 5, 1), ([3, 0, 11, 5], [], [2, 4, 7, 1, 9]), 6),
        (3, 3, 512, 8, 6, (8, 0, 3), ([5, 1], [0, 2, 3, 4], []), 4),
        (2, 1, 40, 4, 5, (4, 2), ([0, 1, 2, 3, 4], [3]), 5),
    ],
    ids=["d64_b3", "d512_b3", "d40_odd"],
)


@DTYPES
@ATTENTION_SHAPES
def test_attention_reference_equals_full_softmax_with_sink(dtype, batch, heads, dim, width, total, counts, picks,
                                                           slots):
    args = _attention_case(batch, heads, dim, width, total, counts, picks, slots, dtype, seed=5)
    got = sparse_decode_attention_ref(*args, dim**-0.5)
    assert got.dtype == dtype and got.shape == (batch, heads, dim)
    assert torch.isfinite(got).all()  # NaN in rows that must not be read never leaks in
    _close(got, _attention_f64(*args, dim**-0.5))


def test_attention_sink_counts_and_unused_slots_all_change_the_result():
    """With finite garbage in the rows that must not be read, each shortcut gives a different answer."""
    args = _attention_case(3, 4, 64, 16, 12, (16, 5, 1), ([3, 0, 11, 5], [], [2, 4, 7, 1, 9]), 6, seed=6,
                           garbage=3.0)
    q, sliding, count, entries, index, sinks = args
    got = sparse_decode_attention_ref(*args, 0.125).double()
    torch.testing.assert_close(got, _attention_f64(*args, 0.125), rtol=1e-5, atol=1e-5)
    for shortcut in (
        _attention_f64(*args, 0.125, with_sink=False),  # the sink dropped
        _attention_f64(*args, 0.125, window=16),  # sliding_count ignored
        _attention_f64(q, sliding, count, entries, index.clamp(min=0), sinks, 0.125),  # -1 read as entry 0
    ):
        assert (shortcut - got).abs().max() > 1e-2


@pytest.mark.parametrize("impl", [sparse_decode_attention_ref, sparse_decode_attention_triton], ids=["ref", "triton"])
def test_attention_with_no_visible_key_is_zero_and_a_lone_key_is_scaled_by_the_sink(impl):
    """Row 0 sees nothing: only the sink, whose probability is dropped -> 0. Row 1 sees one key v:
    out = v * e^l / (e^l + e^sink)."""
    args = _attention_case(2, 2, 32, 4, 3, (0, 1), ([], []), 2, seed=7)
    q, sliding, count, entries, index, sinks = args
    got = impl(*args, 0.2)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    logits = q[1] @ sliding[1, 0] * 0.2  # [H]
    want = torch.sigmoid(logits - sinks)[:, None] * sliding[1, 0]
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-6)


@DTYPES
@ATTENTION_SHAPES
def test_attention_triton_matches_reference(dtype, batch, heads, dim, width, total, counts, picks, slots):
    for seed in (8, 9):
        args = _attention_case(batch, heads, dim, width, total, counts, picks, slots, dtype, seed=seed)
        want = sparse_decode_attention_ref(*args, dim**-0.5)
        got = sparse_decode_attention_triton(*args, dim**-0.5)
        assert got.dtype == dtype and got.shape == (batch, heads, dim)
        _close(got, want.float())


def test_attention_triton_with_int64_counts_int32_index_and_no_entries_at_all():
    args = list(_attention_case(2, 3, 64, 8, 0, (8, 3), ([], []), 3, seed=10))
    args[2], args[4] = args[2].long(), args[4].int()
    torch.testing.assert_close(sparse_decode_attention_triton(*args, 0.1), sparse_decode_attention_ref(*args, 0.1),
                               rtol=1e-5, atol=1e-5)


def test_dispatchers_run_the_references_on_cpu_tensors():
    q, weights, keys, count = _indexer_case(2, 4, 32, 6, (6, 3), seed=11)
    assert torch.equal(indexer_scores(q, weights, keys, count, 0.2), indexer_scores_ref(q, weights, keys, count, 0.2))
    assert torch.equal(indexer_topk(q, weights, keys, count, 4, 0.2), indexer_topk_ref(q, weights, keys, count, 4, 0.2))
    args = _attention_case(2, 2, 32, 4, 3, (4, 2), ([0, 2], [1]), 3, seed=12)
    assert torch.equal(sparse_decode_attention(*args, 0.2), sparse_decode_attention_ref(*args, 0.2))


# ---------------------------------------------------------------------------------------------------
# Bad arguments

def _indexer_args(**overrides):
    q, weights, keys, count = _indexer_case(2, 4, 32, 6, (6, 3), seed=13)
    args = dict(q=q, weights=weights, keys=keys, visible_count=count, scale=0.2)
    return args | overrides


@pytest.mark.parametrize("impl", [indexer_scores_ref, indexer_scores_triton], ids=["ref", "triton"])
@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(q=torch.zeros(2, 4)), ValueError, r"q must have shape \[B, hI, dI\]"),
        (dict(q=torch.zeros(2, 4, 32, dtype=torch.int32)), TypeError, "q must be float32"),
        (dict(weights=torch.zeros(2, 4, dtype=torch.bfloat16)), TypeError, "weights must be float32"),
        (dict(weights=torch.zeros(2, 5)), ValueError, r"weights must have shape \[B, hI\]"),
        (dict(keys=torch.zeros(2, 6, 16)), ValueError, r"keys must have shape \[B, T, dI\]"),
        (dict(keys=torch.zeros(3, 6, 32)), ValueError, "keys"),
        (dict(visible_count=torch.tensor([6.0, 3.0])), TypeError, "visible_count must be int32 or int64"),
        (dict(visible_count=torch.tensor([6, 3, 1])), ValueError, r"visible_count must have shape \[B\]"),
        (dict(visible_count=torch.tensor([7, 3])), ValueError, r"visible_count values must lie in \[0, 6\]"),
        (dict(visible_count=torch.tensor([-1, 3])), ValueError, "visible_count values"),
        (dict(scale=0.0), ValueError, "scale"),
    ],
)
def test_indexer_bad_arguments_raise_naming_the_argument(impl, overrides, error, match):
    with pytest.raises(error, match=match):
        impl(**_indexer_args(**overrides))


@pytest.mark.parametrize("impl", [indexer_topk_ref, indexer_topk_triton], ids=["ref", "triton"])
@pytest.mark.parametrize("k", [0, -2, 2.0, True])
def test_indexer_topk_rejects_a_bad_k(impl, k):
    with pytest.raises(ValueError, match="k must be a positive int"):
        impl(**_indexer_args(), k=k)


def _attention_args(**overrides):
    q, sliding, count, entries, index, sinks = _attention_case(2, 2, 32, 4, 3, (4, 2), ([0, 2], [1]), 3, seed=14)
    args = dict(q=q, sliding=sliding, sliding_count=count, entries=entries, entry_index=index, sinks=sinks, scale=0.2)
    return args | overrides


@pytest.mark.parametrize("impl", [sparse_decode_attention_ref, sparse_decode_attention_triton], ids=["ref", "triton"])
@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(q=torch.zeros(2, 2, 32, 1)), ValueError, r"q must have shape \[B, H, D\]"),
        (dict(q=torch.zeros(2, 2, 32, dtype=torch.float64)), TypeError, "q must be float32"),
        (dict(sliding=torch.zeros(2, 4, 16)), ValueError, r"sliding must have shape \[B, W, D\]"),
        (dict(sliding_count=torch.tensor([4, 2, 1])), ValueError, r"sliding_count must have shape \[B\]"),
        (dict(sliding_count=torch.tensor([5, 2])), ValueError, r"sliding_count values must lie in \[0, 4\]"),
        (dict(sliding_count=torch.tensor([4.0, 2.0])), TypeError, "sliding_count must be int32 or int64"),
        (dict(entries=torch.zeros(1, 3, 32)), ValueError, r"entries must have shape \[B, T, D\]"),
        (dict(entry_index=torch.tensor([[0, 3, -1], [1, -1, -1]])), ValueError, r"entry_index values .*\[-1, 2\]"),
        (dict(entry_index=torch.tensor([[0, -2, -1], [1, -1, -1]])), ValueError, "entry_index values"),
        (dict(entry_index=torch.tensor([0, 1])), ValueError, r"entry_index must have shape \[B, K\]"),
        (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \[H\]"),
        (dict(sinks=torch.zeros(2, dtype=torch.bfloat16)), TypeError, "sinks must be float32"),
        (dict(scale=-1.0), ValueError, "scale must be a positive float"),
    ],
)
def test_attention_bad_arguments_raise_naming_the_argument(impl, overrides, error, match):
    with pytest.raises(error, match=match):
        impl(**_attention_args(**overrides))
