"""V4's FP8 cache (`v4.kv_rows.Model1Rows`: the window keys and compressed entries as MODEL1 rows): rows read
back as the layout's quantize/dequantize of what was stored, the window's pages released as it moves on, a
copy independent of its source; and, teacher-forced through prefill + decode, greedy agreement with the
lossless cache on at least 99% of steps whose top-2 margin is clear, with a logit error that e4m3's precision
explains (within 32x that of rows rounded to bf16: 3 mantissa bits to 7)."""

from __future__ import annotations

import pytest
import torch

from engram_kernels.mla_decode.model1_layout import dequantize_pages, quantize_pages
from model_worker.v4.kv_rows import FloatRows, Model1Rows, model1_layout
from tests.model_worker.v4.test_v4_parity import BASE, DeepseekV4Config, _random_reference

pytestmark = pytest.mark.skipif(DeepseekV4Config is None, reason="this transformers has no deepseek_v4")


def test_model1_rows_store_the_layouts_bytes_and_release_pages():
    from model_worker.v4.page_pool import Model1PagePool, PoolExhausted

    layout = model1_layout(32, 8, block_size=8)
    pool = Model1PagePool(layout)  # grows as needed
    assert (layout.nope_dim, layout.tile, layout.rope_dim) == (24, 24, 8)
    assert model1_layout(512, 64).num_tiles == 7 and model1_layout(512, 64).bytes_per_token == 584
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 21, 32, generator=g) * 3
    store = Model1Rows(pool)
    for start, stop in ((0, 5), (5, 6), (6, 21)):
        store.append(rows[:, start:stop])
    padded = torch.cat((rows, rows.new_zeros(2, 3, 32)), dim=1).view(2 * 3, 8, 32)
    want = dequantize_pages(quantize_pages(padded, layout), layout).view(2, 24, 32)[:, :21]
    assert torch.equal(store.rows(rows), want)
    assert store.nbytes == 2 * 3 * layout.page_bytes and pool.used_pages == 6
    twin = store.copy()  # shares the 6 pages
    assert pool.used_pages == 6
    store.keep_last(7)  # rows 14..20: the first page (rows 0..7) and the second (8..15) partly
    assert torch.equal(store.rows(rows), want[:, 14:]) and store.nbytes == 2 * 2 * layout.page_bytes
    twin.append(rows[:, :1])  # into its last, shared page: copied first
    assert pool.used_pages == 8
    assert torch.equal(store.rows(rows), want[:, 14:]) and twin.count == 22  # the copies share no writes
    assert torch.equal(twin.rows(rows)[:, :21], want)
    twin.release()
    store.release()
    assert pool.used_pages == 0
    fixed = Model1PagePool(layout, num_pages=3)
    small, other = Model1Rows(fixed), Model1Rows(fixed)
    small.append(rows[:1, :16])  # two pages of 8
    other.append(rows[:1, :1])  # the third
    with pytest.raises(PoolExhausted, match="pages are all in use"):
        small.append(rows[:1, 16:17])
    fixed.on_exhausted = lambda: (other.release(), fixed.free_pages > 0)[1]  # as the engine drops a snapshot
    small.append(rows[:1, 16:17])
    assert small.count == 17 and fixed.used_pages == 3 and other.count == 0
    assert torch.equal(small.rows(rows), want[:1, :17])
    plain = FloatRows()
    plain.append(rows)
    plain.keep_last(7)
    assert torch.equal(plain.rows(rows), rows[:, 14:])


def _teacher_forced(model, sequences: torch.Tensor, state) -> torch.Tensor:
    """Logits [B, steps, vocab] before each token from position 20 on: a 20-token prefill then decode steps."""
    with torch.no_grad():
        rows = [model(sequences[:, :20], state)[:, -1]]
        rows += [model(sequences[:, t:t + 1], state)[:, -1] for t in range(20, sequences.shape[1] - 1)]
    return torch.stack(rows, dim=1)


class _Bf16Rows(FloatRows):
    """Rows rounded to bf16 as they are stored: the yardstick for the FP8 rows' error."""

    def append(self, rows: torch.Tensor) -> None:
        super().append(rows.to(torch.bfloat16).to(rows.dtype))


def test_fp8_cache_agrees_with_the_lossless_cache_where_the_margin_is_clear(tmp_path):
    from model_worker.v4 import load_v4_model
    from model_worker.v4.compressor import CompressorState

    _random_reference(BASE, seed=8, std=0.02).save_pretrained(tmp_path)  # transformers' initializer scale
    model = load_v4_model(tmp_path)
    layout = model1_layout(model.config.head_dim, model.config.qk_rope_head_dim)
    sequences = torch.randint(0, 128, (4, 100), generator=torch.Generator().manual_seed(0))
    lossless = _teacher_forced(model, sequences, model.new_state())
    fp8 = _teacher_forced(model, sequences, model.new_state(layout))
    bf16_state = model.new_state()
    for layer in bf16_state.layers:
        layer.keys, layer.compressor = _Bf16Rows(), CompressorState(_Bf16Rows())
    bf16 = _teacher_forced(model, sequences, bf16_state)
    top2 = lossless.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05  # about 7% of this model's logit range
    agree = lossless.argmax(-1) == fp8.argmax(-1)
    err_fp8, err_bf16 = (fp8 - lossless).abs().max().item(), (bf16 - lossless).abs().max().item()
    print(f"\nV4 FP8 cache, teacher-forced 4 x 80 steps: agreement {agree[clear].float().mean():.4f} on "
          f"{int(clear.sum())} clear-margin steps ({agree.float().mean():.4f} on all); max |logit error| fp8 "
          f"{err_fp8:.4f}, bf16 rows {err_bf16:.4f}")
    assert clear.sum() >= 100
    assert agree[clear].float().mean() >= 0.99
    assert err_bf16 < err_fp8 <= 32 * err_bf16
