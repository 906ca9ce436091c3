"""The PANEL methods (`execution.linear_methods`, `execution.experts`): panel-packed weights
(`execution.panel_packs`) in a Linear, the MoE block and a whole model: which products take our C panel kernel
(spies count its calls), that they equal float64, that the packs follow weight updates, and that a model's
logits and greedy tokens are the same with them as with torch's kernels."""

from __future__ import annotations

import pytest
import torch

from engram_kernels.cpu_decode import decode_gemm_available
from model_worker.execution import experts as experts_module
from model_worker.execution import linear_methods as linear_module
from model_worker.execution import panel_packs, policy
from model_worker.execution.experts import PANEL_EXPERTS
from model_worker.execution.linear_methods import PANEL
from tests.model_worker.engine.engine_fixtures import greedy, make_engine, random_prompt, run_to_completion, tiny_model
from tests.model_worker.kernel_spies import spy_on
from tests.model_worker.test_fused_weights import _moe, _moe_reference, _storage

linear = PANEL.run

pytestmark = pytest.mark.skipif(not decode_gemm_available(), reason="no C kernels on this machine")


@pytest.fixture
def spy(monkeypatch):
    return spy_on(monkeypatch, linear_module, "panel_gemm")


@pytest.fixture
def grouped_spy(monkeypatch):
    return spy_on(monkeypatch, experts_module, "grouped_panel_gemm")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [1, 3, 16, 45])
def test_every_fp32_row_count_through_a_packed_weight_takes_the_kernel(spy, rows):
    g = _gen(rows)
    weight, bias = torch.randn(70, 48, generator=g), torch.randn(70, generator=g)
    assert panel_packs.pack(weight)
    x = torch.randn(2, rows, 48, generator=g)
    want = x.double() @ weight.double().t()
    base = torch.randn(rows, 70, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, weight).double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x, weight, bias).double(), want + bias.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x[:, :, :24], weight[:, :24]).shape, (2, rows, 70))  # a view: no pack
        got = PANEL.accumulate(base, x[0], weight, 0.5)
    torch.testing.assert_close(got.double(), base.double() + 0.5 * want[0], rtol=1e-5, atol=1e-5)
    assert spy.calls == 3


def test_unpacked_bf16_and_gradient_products_run_torchs_kernel(spy):
    g = _gen(2)
    weight = torch.randn(40, 32, generator=g)
    panel_packs.pack(weight)
    bf16 = weight.to(torch.bfloat16)
    panel_packs.pack(bf16)  # refused: fp32 only
    assert panel_packs.panel(bf16) is None
    with torch.inference_mode():
        linear(torch.randn(3, 32, generator=g), torch.randn(40, 32, generator=g))  # no pack
        linear(torch.randn(3, 32, generator=g).to(torch.bfloat16), bf16)
    trained = torch.randn(40, 32, generator=g, requires_grad=True)
    panel_packs.pack(trained)
    x = torch.randn(3, 32, generator=g, requires_grad=True)
    linear(x, trained).sum().backward()  # autograd needs torch's kernel
    assert x.grad is not None and spy.calls == 0


def test_a_weight_updated_in_place_is_packed_again():
    weight = torch.nn.Parameter(torch.randn(33, 20, generator=_gen(3)), requires_grad=False)
    panel_packs.pack(weight)
    x = torch.randn(4, 20, generator=_gen(4))
    with torch.inference_mode():
        linear(x, weight)
    with torch.no_grad():
        weight.mul_(-2.0)
    with torch.inference_mode():
        got = linear(x, weight)
    torch.testing.assert_close(got.double(), x.double() @ weight.double().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_a_packed_moe_runs_all_experts_in_two_grouped_calls_at_any_row_count(grouped_spy, tokens):
    moe = _moe(seed=tokens)
    moe.experts_method = PANEL_EXPERTS
    PANEL_EXPERTS.prepare(moe)
    x = torch.randn(1, tokens, 64, generator=_gen(tokens))
    with torch.inference_mode():
        got = moe(x)
        want = _moe_reference(moe, x[0])
    torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=1e-4)
    assert grouped_spy.calls == 2


def test_a_model_keeps_panel_copies_and_computes_the_same_logits_as_with_torchs_kernels():
    model = tiny_model(seed=21)  # loaded, so arranged: fp32 layers get the PANEL methods
    ids = torch.randint(5, model.config.vocab_size, (2, 9), generator=_gen(5))
    state = {name: t.clone() for name, t in model.state_dict().items()}
    weights = model.decode_gemm_weights()
    assert all(panel_packs.panel(w) is not None for _, w in weights)
    layer = model.model.layers[1].mlp  # a MoE layer
    stack, views = layer._stacked_gate_up.get(), layer._stacked_gate_up.per_group()[0]
    assert all(_storage(panel_packs.panel(v)) == _storage(panel_packs.panel(stack)) for v in views)  # one copy
    stacks = sum(panel_packs.panel(w).numel() * 4 for name, w in weights if "._stacked_" not in name)
    assert panel_packs.panel_bytes() >= stacks
    with torch.inference_mode():
        panel_logits = model(ids)
    model.arrange_weights(pack=False)
    assert all(panel_packs.panel(w) is None for _, w in weights) and panel_packs.panel(stack) is None
    with torch.inference_mode():
        plain_logits = model(ids)
    torch.testing.assert_close(panel_logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())
    policy.set_cpu_gemm_mode("torch")
    try:
        model.arrange_weights()
        assert all(panel_packs.panel(w) is None for _, w in weights)
    finally:
        policy.set_cpu_gemm_mode(None)


def test_the_engine_generates_the_same_tokens_with_and_without_panel_copies(grouped_spy):
    prompts = [random_prompt(length, seed=length) for length in (5, 23, 70)]
    tokens = []
    for panels in (True, False):
        engine = make_engine(tiny_model(seed=22).arrange_weights(pack=panels), kv_cache_dtype="bf16")
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy(12))
        outputs = run_to_completion(engine)
        tokens.append({rid: [t for out in outs for t in out.new_token_ids] for rid, outs in outputs.items()})
        if panels:
            assert grouped_spy.calls > 0
    assert tokens[0] == tokens[1] and all(len(t) == 12 for t in tokens[0].values())
