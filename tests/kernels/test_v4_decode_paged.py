"""V4 sparse decode attention over MODEL1 FP8 pages: the reference against `sparse_decode_attention_ref` on
rows dequantized here from the tokens written (not read back through the page lists), the Triton kernel
(run by the interpreter on CPU) against the reference for fp32 and bf16 q on a small layout and the V4
one, pools whose unread bytes and page-list slots hold garbage (NaN codes included), and bad arguments.

Pools are built at shuffled page ids, so no sequence's pages are contiguous; rows have different
window_first / window_count (a window crossing pages, a row with count 0) and entry selections with
-1 slots crossing pages (and a row with none)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from engram_kernels.mla_decode.model1_layout import Model1CacheLayout, dequantize_tokens, page_views, quantize_tokens
from engram_kernels.v4_decode import (
    sparse_decode_attention_paged,
    sparse_decode_attention_paged_ref,
    sparse_decode_attention_paged_triton,
    sparse_decode_attention_ref,
)

SMALL = Model1CacheLayout(nope_dim=24, rope_dim=8, tile=8, block_size=8)
V4 = Model1CacheLayout()  # nope 448, rope 64, tile 64, block_size 64
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
NAN = float("nan")

# Per row: (window_first, window_count, page-list length Pw, entry_index slots, entry page-list length Pe).
# SMALL (block_size 8): row 0's window covers positions 5..10 (two pages), row 1 has an empty window
# (window_first 3) and no page, row 2 covers 2..20 (three pages) and selects no entry.
SMALL_ROWS = [(5, 6, 3, [17, 2, -1, 9, 23, -1], 3), (3, 0, 2, [0, -1, 12, 7, -1, -1], 2),
              (2, 19, 3, [-1] * 6, 2)]
# V4 (block_size 64): row 0's window covers 50..79 (two pages), row 2's exactly one full page.
V4_ROWS = [(50, 30, 2, [70, 3, -1, 127, 64], 2), (10, 0, 2, [5, -1, 100, -1, -1], 2), (0, 64, 2, [-1] * 5, 1)]


@dataclass
class Case:
    """The op's arguments over a pool of `clean` bytes (zeros where no token was written) and `garbage` bytes
    (random, NaN patterns included, where no token was written), and the rows written there."""

    q: torch.Tensor
    clean: torch.Tensor
    garbage: torch.Tensor
    window_pages: torch.Tensor
    window_first: torch.Tensor
    window_count: torch.Tensor
    entry_pages: torch.Tensor
    entry_index: torch.Tensor
    sinks: torch.Tensor
    scale: float
    layout: Model1CacheLayout
    sliding: torch.Tensor  # fp32 [B, W, D]: window row j of row b as written (dequantized), NaN past the count
    entries: torch.Tensor  # fp32 [B, Pe * block_size, D]: entry e of row b as written, NaN where not written

    def args(self, pool: torch.Tensor | None = None, **overrides) -> dict:
        args = dict(q=self.q, pool=self.clean if pool is None else pool, window_pages=self.window_pages,
                    window_first=self.window_first, window_count=self.window_count, entry_pages=self.entry_pages,
                    entry_index=self.entry_index, sinks=self.sinks, scale=self.scale, layout=self.layout)
        return args | overrides


def _garbage_bytes(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random bytes with plenty of 0x7F / 0xFF: NaN as e4m3 and e8m0 codes, NaN or inf as a bf16 high byte."""
    out = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    flat = out.view(-1)
    flat[::5] = 0x7F
    flat[1::7] = 0xFF
    return out


def _case(layout: Model1CacheLayout, rows: list, heads: int, dtype: torch.dtype = torch.float32, seed: int = 0,
          index_dtype: torch.dtype = torch.int64, garbage_ids: bool = False) -> Case:
    """Write each row's window rows and selected entries (only those) into pages at shuffled ids. Page-list
    slots no read uses hold -1, or out-of-range ids with garbage_ids."""
    g = torch.Generator().manual_seed(seed)
    bs, dim = layout.block_size, layout.head_dim
    batch = len(rows)
    pw, pe = (max(r[i] for r in rows) for i in (2, 4))
    slots = max(len(r[3]) for r in rows)
    needed = sum(-(-(first + count) // bs) if count else 0 for first, count, *_ in rows)
    needed += sum(len({e // bs for e in index if e >= 0}) for *_, index, _ in rows)
    ids = iter(torch.randperm(needed + 3, generator=g).tolist())  # 3 pages nobody uses

    window_pages = torch.full((batch, pw), -1, dtype=torch.int64)
    entry_pages = torch.full((batch, pe), -1, dtype=torch.int64)
    sliding = torch.full((batch, max(r[1] for r in rows), dim), NAN)
    entries = torch.full((batch, pe * bs, dim), NAN)
    written: list[tuple[int, int, torch.Tensor]] = []  # (page, slot, token kv)
    for b, (first, count, _, index, _) in enumerate(rows):
        for j in range(count):
            pos = first + j
            if window_pages[b, pos // bs] < 0:
                window_pages[b, pos // bs] = next(ids)
            kv = torch.randn(dim, generator=g)
            written.append((int(window_pages[b, pos // bs]), pos % bs, kv))
            sliding[b, j] = dequantize_tokens(*quantize_tokens(kv, layout), layout)
        for e in sorted({e for e in index if e >= 0}):
            if entry_pages[b, e // bs] < 0:
                entry_pages[b, e // bs] = next(ids)
            kv = torch.randn(dim, generator=g)
            written.append((int(entry_pages[b, e // bs]), e % bs, kv))
            entries[b, e] = dequantize_tokens(*quantize_tokens(kv, layout), layout)
    if garbage_ids:  # ids in page-list slots nothing reads: never looked at
        junk = torch.tensor([-7, 10**6, needed + 3, -1])
        for pages in (window_pages, entry_pages):
            pages[pages < 0] = junk[torch.randint(0, 4, (int((pages < 0).sum()),), generator=g)]

    clean = torch.zeros(needed + 3, layout.page_bytes, dtype=torch.uint8)
    garbage = _garbage_bytes(tuple(clean.shape), g)
    for pool in (clean, garbage):
        data, scale_slots = page_views(pool, layout)
        for page, slot, kv in written:
            data[page, slot], scale_slots[page, slot] = quantize_tokens(kv, layout)

    index = torch.full((batch, slots), -1, dtype=torch.int64)
    for b, row in enumerate(rows):
        index[b, : len(row[3])] = torch.tensor(row[3])
    return Case(
        q=torch.randn(batch, heads, dim, generator=g).to(dtype), clean=clean, garbage=garbage,
        window_pages=window_pages.to(index_dtype), window_first=torch.tensor([r[0] for r in rows], dtype=index_dtype),
        window_count=torch.tensor([r[1] for r in rows], dtype=index_dtype), entry_pages=entry_pages.to(index_dtype),
        entry_index=index, sinks=torch.randn(heads, generator=g), scale=dim**-0.5, layout=layout,
        sliding=sliding, entries=entries,
    )


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 results agree to 1e-5; bf16 outputs to bf16 rounding (assert_close's bf16 defaults)."""
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got, want.to(torch.bfloat16))
    else:
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)


def _by_hand(case: Case) -> torch.Tensor:
    """sparse_decode_attention_ref on the rows as written."""
    return sparse_decode_attention_ref(case.q, case.sliding, case.window_count, case.entries, case.entry_index,
                                       case.sinks, case.scale)


LAYOUTS = pytest.mark.parametrize("layout,rows,heads", [(SMALL, SMALL_ROWS, 4), (V4, V4_ROWS, 3)],
                                  ids=["small", "v4"])


# ---------------------------------------------------------------------------------------------------
# Reference

@DTYPES
@LAYOUTS
def test_reference_equals_unpaged_reference_on_the_rows_written(dtype, layout, rows, heads):
    case = _case(layout, rows, heads, dtype, seed=1)
    got = sparse_decode_attention_paged_ref(**case.args())
    assert got.dtype == dtype and got.shape == (3, heads, layout.head_dim)
    torch.testing.assert_close(got, _by_hand(case), rtol=0, atol=1e-6)
    assert got.abs().amax(dim=(1, 2)).min() > 1e-2  # every row sees some key


def test_reference_reads_the_right_rows():
    """Shifting a window by one slot, swapping a row's entry pages or using another row's pages changes the
    answer, so the equality above pins the addressing down."""
    case = _case(SMALL, SMALL_ROWS, 4, seed=2)
    want = sparse_decode_attention_paged_ref(**case.args())
    swapped = case.entry_pages.clone()
    swapped[0] = swapped[0].flip(0)
    shifted = case.window_first.clone()
    shifted[0] += 1
    for overrides in (dict(window_first=shifted), dict(entry_pages=swapped),
                      dict(window_pages=case.window_pages[[2, 1, 0]], window_count=case.window_count.clamp(max=6))):
        got = sparse_decode_attention_paged_ref(**case.args(**overrides))
        assert (got - want).abs().max() > 1e-2, overrides


@pytest.mark.parametrize("impl", [sparse_decode_attention_paged_ref, sparse_decode_attention_paged_triton],
                         ids=["ref", "triton"])
def test_nothing_to_read_gives_zero_even_with_no_pages(impl):
    """A row with an empty window and no selected entry sees only the sink: zero output; with no page at all."""
    case = _case(SMALL, [(4, 0, 1, [-1, -1], 1), (0, 0, 1, [-1, -1], 1)], 2, seed=3)
    pool = torch.zeros(0, SMALL.page_bytes, dtype=torch.uint8)
    got = impl(**case.args(pool))
    assert torch.equal(got, torch.zeros_like(got))


# ---------------------------------------------------------------------------------------------------
# Triton kernel

@DTYPES
@LAYOUTS
def test_triton_matches_reference(dtype, layout, rows, heads):
    for seed, index_dtype in ((4, torch.int64), (5, torch.int32)):
        case = _case(layout, rows, heads, dtype, seed=seed, index_dtype=index_dtype)
        want = sparse_decode_attention_paged_ref(**case.args())
        got = sparse_decode_attention_paged_triton(**case.args())
        assert got.dtype == dtype and got.shape == (3, heads, layout.head_dim)
        _close(got, want.float())


def test_triton_with_a_head_dim_short_of_a_power_of_two_and_garbage_everywhere_unread():
    """D = 18 (nope 12 in 3 tiles of 4, rope 6) in a 32-wide tile, pages of 4 tokens, garbage bytes and ids."""
    layout = Model1CacheLayout(nope_dim=12, rope_dim=6, tile=4, block_size=4)
    rows = [(3, 6, 3, [1, 7, -1], 2), (0, 0, 1, [6, 0, 3], 2), (1, 3, 1, [-1, -1, -1], 1)]
    case = _case(layout, rows, 2, seed=6, garbage_ids=True)
    want = sparse_decode_attention_paged_ref(**case.args())
    torch.testing.assert_close(want, _by_hand(case), rtol=0, atol=1e-6)
    _close(sparse_decode_attention_paged_triton(**case.args(case.garbage)), want)


# ---------------------------------------------------------------------------------------------------
# Bytes that must never be read

@pytest.mark.parametrize("impl", [sparse_decode_attention_paged_ref, sparse_decode_attention_paged_triton],
                         ids=["ref", "triton"])
@LAYOUTS
def test_unread_bytes_and_page_ids_do_not_matter(impl, layout, rows, heads):
    case = _case(layout, rows, heads, seed=7, garbage_ids=True)
    assert torch.isnan(page_views(case.garbage, layout)[0].view(torch.float8_e4m3fn).float()).any()
    assert torch.isnan(page_views(case.garbage, layout)[1].view(torch.float8_e8m0fnu).float()).any()
    want = impl(**case.args())
    got = impl(**case.args(case.garbage))
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


def test_dispatcher_runs_the_reference_on_cpu_tensors():
    case = _case(SMALL, SMALL_ROWS, 4, seed=8)
    assert torch.equal(sparse_decode_attention_paged(**case.args()), sparse_decode_attention_paged_ref(**case.args()))


# ---------------------------------------------------------------------------------------------------
# Bad arguments

_BAD = _case(SMALL, [(5, 6, 2, [9, -1], 2), (0, 0, 1, [-1, -1], 1)], 2, seed=9)
_P = _BAD.clean.shape[0]


def _with(tensor: torch.Tensor, where: tuple, value: int) -> torch.Tensor:
    out = tensor.clone()
    out[where] = value
    return out


@pytest.mark.parametrize("impl", [sparse_decode_attention_paged_ref, sparse_decode_attention_paged_triton],
                         ids=["ref", "triton"])
@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(q=torch.zeros(2, 2, 32, dtype=torch.int32)), TypeError, "q must be float32"),
        (dict(q=torch.zeros(2, 2)), ValueError, r"q must have shape \[B, H, D\]"),
        (dict(q=torch.zeros(2, 2, 31)), ValueError, r"q must have shape \[B, H, D = nope_dim \+ rope_dim\]"),
        (dict(pool=torch.zeros(_P, SMALL.page_bytes)), TypeError, "pool must be uint8"),
        (dict(pool=torch.zeros(_P, SMALL.page_bytes - 1, dtype=torch.uint8)), ValueError,
         rf"pool must have shape \[num_pages, page_bytes\] = \[num_pages, {SMALL.page_bytes}\]"),
        (dict(pool=torch.zeros(SMALL.page_bytes, 2 * _P, dtype=torch.uint8)[:, ::2].t()), ValueError,
         "pool must be contiguous within each page"),
        (dict(layout=(24, 8, 8, 8)), TypeError, "layout must be a Model1CacheLayout"),
        (dict(layout=Model1CacheLayout(nope_dim=24, rope_dim=8, tile=8, block_size=4)), ValueError, "pool"),
        (dict(window_pages=_BAD.window_pages.float()), TypeError, "window_pages must be int32 or int64"),
        (dict(window_pages=_BAD.window_pages[0]), ValueError, r"window_pages must have shape \[B, Pw\]"),
        (dict(window_first=torch.tensor([5, 0, 0])), ValueError, r"window_first must have shape \[B\]"),
        (dict(window_first=torch.tensor([8, 0])), ValueError, r"window_first values must lie in \[0, 7\]"),
        (dict(window_first=torch.tensor([-1, 0])), ValueError, "window_first values"),
        (dict(window_count=torch.tensor([6.0, 0.0])), TypeError, "window_count must be int32 or int64"),
        (dict(window_count=torch.tensor([6, -1])), ValueError, "window_count values must be >= 0"),
        (dict(window_count=torch.tensor([12, 0])), ValueError, r"window_first \+ window_count must be <= 16"),
        (dict(window_pages=_with(_BAD.window_pages, (0, 1), -1)), ValueError,
         r"window_pages: page ids holding valid window rows must lie in \[0, "),
        (dict(window_pages=_with(_BAD.window_pages, (0, 0), _P)), ValueError, "window_pages: page ids"),
        (dict(entry_pages=_BAD.entry_pages[:, :, None]), ValueError, r"entry_pages must have shape \[B, Pe\]"),
        (dict(entry_pages=_with(_BAD.entry_pages, (0, 1), -1)), ValueError,
         r"entry_pages: page ids holding selected entries must lie in \[0, "),
        (dict(entry_pages=_with(_BAD.entry_pages, (0, 1), _P + 5)), ValueError, "entry_pages: page ids"),
        (dict(entry_index=_with(_BAD.entry_index, (1, 0), 16)), ValueError, r"entry_index values .*\[-1, 15\]"),
        (dict(entry_index=_with(_BAD.entry_index, (1, 0), -2)), ValueError, "entry_index values"),
        (dict(entry_index=_BAD.entry_index.double()), TypeError, "entry_index must be int32 or int64"),
        (dict(entry_index=_BAD.entry_index[:1]), ValueError, r"entry_index must have shape \[B, K\]"),
        (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \[H\]"),
        (dict(sinks=torch.zeros(2, dtype=torch.bfloat16)), TypeError, "sinks must be float32"),
        (dict(scale=0.0), ValueError, "scale must be a positive float"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(impl, overrides, error, match):
    with pytest.raises(error, match=match):
        impl(**_BAD.args(**overrides))


@pytest.mark.parametrize("impl", [sparse_decode_attention_paged_ref, sparse_decode_attention_paged_triton],
                         ids=["ref", "triton"])
def test_page_list_slots_nothing_reads_may_hold_any_id(impl):
    """Row 0's window ends in page slot 1 and selects only entry 9 (page slot 1): the other slots are free."""
    pages = _BAD.window_pages.clone()
    pages[1, 0] = -5
    entries = _with(_BAD.entry_pages, (0, 0), 10**9)
    torch.testing.assert_close(impl(**_BAD.args(window_pages=pages, entry_pages=entries)), impl(**_BAD.args()),
                               rtol=0, atol=0)
