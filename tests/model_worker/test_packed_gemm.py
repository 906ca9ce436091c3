"""oneDNN-packed weights (`model_worker.execution.packed_gemm`) through `linear`, the MoE and a whole model.

Every product is checked against float64 or against the same model without packs; spies confirm that
the packed kernel really ran (or, where it must not, that it did not). The conftest pins packing on with
no per-shape timing, so these paths are the ones the rest of the suite runs too (beyond the few rows
that the C decode kernel takes, which these tests turn off).
"""

from __future__ import annotations

import gc

import pytest
import torch

from model_worker.execution import experts as experts_module
from model_worker.execution import gemm as linear_module
from model_worker.execution import packed_gemm
from model_worker.execution.gemm import linear, linear_accumulate
from tests.model_worker.engine.engine_fixtures import tiny_model
from tests.model_worker.kernel_spies import pinned_cpu_gemm, spy_on
from tests.model_worker.test_fused_weights import _moe, _moe_reference, _storage

pytestmark = pytest.mark.skipif(not packed_gemm.packable(torch.zeros(2, 2)), reason="torch without oneDNN")
BF16 = packed_gemm.packable(torch.zeros(2, 2, dtype=torch.bfloat16))


@pytest.fixture(autouse=True)
def _packed_not_native():
    """These tests are about the packed kernel: keep our C kernels (the decode kernel would take few rows, the
    panel kernel every fp32 weight) out."""
    with pinned_cpu_gemm(native_max_rows=0, panel_weights=False):
        yield


@pytest.fixture
def spy(monkeypatch):
    return spy_on(monkeypatch, linear_module, "packed_linear")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 64, 300])
@pytest.mark.parametrize("input_major", [False, True])
def test_packed_linear_equals_float64_for_any_row_count_and_weight_order(spy, rows, input_major):
    g = _gen(rows)
    weight = torch.randn(96, 80, generator=g)
    weight = weight.t().contiguous().t() if input_major else weight
    bias = torch.randn(96, generator=g)
    assert packed_gemm.pack(weight)
    x = torch.randn(rows, 80, generator=g)
    want = x.double() @ weight.double().t()
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, weight).double(), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(linear(x, weight, bias).double(), want + bias.double(), rtol=1e-5, atol=1e-4)
        three_d = linear(x.view(1, rows, 80), weight)
    assert three_d.shape == (1, rows, 96)
    assert spy.calls == 3


@pytest.mark.skipif(not BF16, reason="this CPU has no oneDNN bf16")
def test_packed_bf16_linear_is_within_bf16_rounding_of_float64(spy):
    g = _gen(1)
    weight = torch.randn(128, 64, generator=g).bfloat16()
    x = torch.randn(7, 64, generator=g).bfloat16()
    packed_gemm.pack(weight)
    with torch.inference_mode():
        got = linear(x, weight)
    assert got.dtype == torch.bfloat16 and spy.calls == 1
    want = x.double() @ weight.double().t()
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("rows", [1, 6])
def test_packed_linear_accumulate_is_out_plus_alpha_times_the_product(rows):
    g = _gen(7)
    weight, x, out = torch.randn(48, 32, generator=g), torch.randn(rows, 32, generator=g), torch.randn(rows, 48)
    packed_gemm.pack(weight)
    want = out.double() + 0.37 * (x.double() @ weight.double().t())
    with torch.inference_mode():
        torch.testing.assert_close(linear_accumulate(out, x, weight, 0.37).double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear_accumulate(out, x, weight, 1.0).double(), want - 0.37 * (
            x.double() @ weight.double().t()) + x.double() @ weight.double().t(), rtol=1e-5, atol=1e-5)


def test_an_in_place_update_or_new_storage_is_repacked_before_use():
    g = _gen(2)
    weight = torch.nn.Parameter(torch.randn(64, 32, generator=g))
    x = torch.randn(3, 32, generator=g)
    packed_gemm.pack(weight)
    with torch.no_grad():
        weight.mul_(2.0)  # in place: same storage, new version
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, weight), x @ weight.detach().t(), rtol=1e-5, atol=1e-5)
    weight.data = torch.randn(64, 32, generator=g)  # new storage
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, weight), x @ weight.detach().t(), rtol=1e-5, atol=1e-5)
    weight.data = weight.data.bfloat16() if BF16 else weight.data.double()
    with torch.inference_mode():  # a new dtype: repacked, or (float64: not packable) run unpacked
        got = linear(x.to(weight.dtype), weight)
    torch.testing.assert_close(got.double(), x.to(weight.dtype).double() @ weight.detach().double().t(),
                               rtol=2e-2, atol=5e-2)


def test_a_pack_is_released_with_its_weight_or_by_unpack(spy):
    before = packed_gemm.packed_count()
    weight = torch.randn(40, 24)
    packed_gemm.pack(weight)
    assert packed_gemm.packed_count() == before + 1
    packed_gemm.unpack(weight)
    assert packed_gemm.packed(weight) is None and packed_gemm.packed_count() == before
    with torch.inference_mode():
        linear(torch.randn(2, 24), weight)
    assert spy.calls == 0  # unpacked: torch's own kernel
    packed_gemm.pack(weight)
    del weight
    gc.collect()
    assert packed_gemm.packed_count() == before


def test_gradients_are_never_cut_by_the_packed_kernel(spy):
    weight = torch.nn.Parameter(torch.randn(16, 8))
    packed_gemm.pack(weight)
    out = linear(torch.randn(2, 8), weight)
    assert out.requires_grad and spy.calls == 0
    out.sum().backward()
    assert weight.grad is not None


def test_unpackable_weights_are_refused():
    assert not packed_gemm.pack(torch.randn(4, 4, dtype=torch.float64))
    assert not packed_gemm.pack(torch.randn(2, 4, 4))
    assert not packed_gemm.pack(torch.empty(4, 4, device="meta"))
    assert not packed_gemm.pack(torch.randn(4, 4).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("tokens", [2, 16])
def test_packed_experts_run_one_packed_gemm_each_and_equal_the_definition(monkeypatch, spy, tokens):
    moe = _moe(seed=5)
    for fusion in (moe._stacked_gate_up, moe._stacked_down):
        fusion.get()
        for view in fusion.per_group()[0]:
            packed_gemm.pack(view)
    grouped = spy_on(monkeypatch, experts_module, "grouped_linear")
    x = torch.randn(1, tokens, 64, generator=_gen(tokens))
    with torch.inference_mode():
        want = _moe_reference(moe, x[0])
        got = moe(x)
    torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=1e-4)
    assert grouped.calls == 0
    used = len(set(moe.gate(x[0])[1].flatten().tolist()))
    assert spy.calls >= 2 * used  # gate+up and down of every expert with tokens


def test_a_model_packs_every_decode_gemm_weight_and_computes_the_same_logits():
    model = tiny_model(seed=11)  # build_random_model arranges; the conftest pins packing on
    ids = torch.randint(5, model.config.vocab_size, (2, 7), generator=_gen(0))
    state = {name: t.clone() for name, t in model.state_dict().items()}
    layer = model.model.layers[1].mlp  # a MoE layer
    views = [*layer._stacked_gate_up.per_group()[0], *layer._stacked_down.per_group()[0]]
    assert all(packed_gemm.packed(v) is not None for v in views)
    assert packed_gemm.packed(model.lm_head.weight) is not None
    assert packed_gemm.packed(model.model.layers[0].self_attn.kv_b_proj.weight) is None  # read per head
    with torch.inference_mode():
        packed_logits = model(ids)
    model.arrange_weights(pack=False)
    assert all(packed_gemm.packed(v) is None for v in views)
    with torch.inference_mode():
        plain_logits = model(ids)
    torch.testing.assert_close(packed_logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())


def test_expert_weights_live_once_in_the_moe_stack_and_are_not_restacked_at_the_first_step():
    """Each expert MLP also owns a gate+up fusion; arranging must not let it copy the expert's weights out
    of the MoE's stack (which the stack would then rebuild at the first forward, leaving two copies)."""
    model = tiny_model(seed=12)
    layer = model.model.layers[1].mlp
    stack = layer._stacked_gate_up._tensor
    assert stack is not None
    for expert in layer.experts:
        assert expert._gate_up._tensor is None
        assert _storage(expert.gate_proj.weight) == _storage(stack)
    with torch.inference_mode():
        model(torch.randint(5, model.config.vocab_size, (1, 5), generator=_gen(1)))
    assert layer._stacked_gate_up._tensor is stack


def test_load_model_packs_by_default_and_not_when_told(tmp_path):
    from model_worker import load_model, save_model

    save_model(tiny_model(seed=13), tmp_path)
    for pack, want in ((True, True), (False, False)):
        model = load_model(tmp_path, pack_weights=pack)
        weights = model.decode_gemm_weights()
        assert weights and all((packed_gemm.packed(w) is not None) == want for _, w in weights)


def test_packed_bytes_counts_the_values_of_live_packs():
    before = packed_gemm.packed_bytes()
    weight = torch.randn(64, 32)
    packed_gemm.pack(weight)
    assert packed_gemm.packed_bytes() == before + 64 * 32 * 4
    packed_gemm.unpack(weight)
    assert packed_gemm.packed_bytes() == before
