"""Decode weight layout (`model_worker.execution.layout`, `CausalLM.arrange_weights`).

The layout may change strides only: every check compares values, state_dict() and logits against the
same model stored in nn.Linear's order, and the saved checkpoint against the original tensors.
"""

from __future__ import annotations

import pytest
import torch

from model_worker import load_model, save_model
from model_worker.execution.fused import fusions_of
from model_worker.execution.layout import arranged, is_input_major, prefers_input_major
from model_worker.layers.linear import Linear
from tests.model_worker.engine.engine_fixtures import tiny_model


@pytest.mark.parametrize("shape", [(96, 64), (64, 64), (3, 96, 64)])
def test_wide_fp32_weights_are_stored_input_major_with_the_same_values(shape):
    weight = torch.randn(shape)
    out = arranged(weight)
    assert prefers_input_major(weight) and is_input_major(out) and not out.is_contiguous()
    assert out.shape == weight.shape and torch.equal(out, weight)
    assert out.transpose(-1, -2).is_contiguous()  # [..., in, out] in memory
    assert arranged(out) is out  # already in order: no copy


@pytest.mark.parametrize("weight", [torch.randn(32, 64), torch.randn(96, 64, dtype=torch.bfloat16),
                                    torch.randn(64, 96).t()])
def test_narrow_or_half_precision_weights_stay_or_become_output_major(weight):
    """out < in, bf16, or a transposed [96, 64] view of a [64, 96] buffer that is out of its order."""
    out = arranged(weight)
    if weight.dtype == torch.float32 and weight.shape[0] >= weight.shape[1]:
        assert is_input_major(out)  # the transposed view already is input-major
    else:
        assert out.is_contiguous() and not is_input_major(out)
    assert torch.equal(out, weight)


def _layouts(model) -> dict[str, str]:
    """name -> 'in' / 'out' / 'other' for every Linear weight and the head."""
    def kind(t):
        return "in" if is_input_major(t) else "out" if t.is_contiguous() else "other"

    names = {name: kind(module.weight) for name, module in model.named_modules() if isinstance(module, Linear)}
    names["lm_head"] = kind(model.lm_head.weight)
    return names


def test_arrange_weights_changes_strides_not_values_or_logits(tmp_path):
    model = tiny_model(seed=3)  # build_random_model arranges
    ids = torch.randint(5, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    state = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.inference_mode():
        arranged_logits = model(ids)
    layouts = _layouts(model)
    assert layouts["lm_head"] == "in"  # [vocab, hidden]: out >= in
    assert layouts["model.layers.0.self_attn.o_proj"] == "in"  # [64, 32]
    assert layouts["model.layers.0.self_attn.kv_b_proj"] == "out"  # read per head, never re-laid
    dense = model.model.layers[0].mlp
    assert dense.down_proj.weight.is_contiguous()  # [64, 96]: out < in keeps nn.Linear's order
    stacked = model.model.layers[1].mlp._stacked_gate_up.get()  # [E, 2 * 32, 64]: out == in
    assert is_input_major(stacked)

    model.arrange_weights(input_major=False)
    assert set(_layouts(model).values()) == {"out"}
    assert all(f.get() is None or f.get().is_contiguous() for m in model.modules() for f in fusions_of(m).values())
    after = model.state_dict()
    assert all(torch.equal(after[name], t) for name, t in state.items())
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), arranged_logits, rtol=1e-5, atol=1e-5)

    model.arrange_weights()
    assert _layouts(model) == layouts
    save_model(model, tmp_path / "ckpt")  # saves contiguous copies
    loaded = load_model(tmp_path / "ckpt")
    assert _layouts(loaded) == layouts
    assert all(torch.equal(loaded.state_dict()[name], t) for name, t in state.items())
    with torch.inference_mode():
        assert torch.equal(loaded(ids), arranged_logits)


def test_cast_to_bf16_stores_every_weight_output_major():
    model = tiny_model(seed=4)
    model.cast(torch.bfloat16)
    layouts = _layouts(model)
    assert layouts["lm_head"] == "out" and set(layouts.values()) == {"out"}
    assert all(f.get() is None or f.get().is_contiguous() for m in model.modules() for f in fusions_of(m).values())
    model.cast(torch.float32)
    assert _layouts(model)["lm_head"] == "in"


def test_a_tied_head_stays_the_row_major_embedding_table():
    model = tiny_model(seed=5, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.is_contiguous()


@pytest.mark.parametrize("input_major", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 15, 16, 40, 512, 513])
def test_linear_matches_float64_in_either_order_across_the_wide_product_bounds(input_major, rows):
    """`linear` runs 2..512 fp32 rows (16..512 input-major) as (W @ x^T)^T, else F.linear: every path
    must compute x @ W^T + b, for flat and batched leading dims, with and without bias."""
    from model_worker.execution.gemm import linear

    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(72, 40, generator=g)
    weight = arranged(weight) if input_major else weight
    assert is_input_major(weight) == input_major
    bias = torch.randn(72, generator=g)
    for shape in ((rows, 40), (1, rows, 40)):
        x = torch.randn(shape, generator=g)
        want = x.double() @ weight.double().t()
        for b, ref in ((None, want), (bias, want + bias.double())):
            got = linear(x, weight, b)
            assert got.shape == (*shape[:-1], 72) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.view(-1, 72)[:, :3], got.reshape(-1, 72)[:, :3])  # a usable view


def test_bf16_decode_reads_kv_b_in_fp32_from_a_kept_copy_that_follows_weight_updates():
    model = tiny_model(seed=8).cast(torch.bfloat16)
    attn = model.model.layers[0].self_attn
    w_uk, w_uv = attn.kv_b_weights(torch.float32)
    assert w_uk.dtype == w_uv.dtype == torch.float32
    assert all(torch.equal(a, b.float()) for a, b in zip((w_uk, w_uv), attn.kv_b_weights()))
    assert attn.kv_b_weights(torch.float32)[0].data_ptr() == w_uk.data_ptr()  # kept, not converted per step
    with torch.no_grad():
        attn.kv_b_proj.weight.mul_(2)  # in place: same storage, new version
    assert torch.equal(attn.kv_b_weights(torch.float32)[0], attn.kv_b_weights()[0].float())
    assert torch.equal(attn.kv_b_weights(torch.float32)[0], 2 * w_uk)
