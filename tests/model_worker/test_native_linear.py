"""The C decode kernel (`engram_kernels.cpu_decode`) inside `layers.linear` and a whole model: which products it
takes (a spy counts its calls), that they equal float64, and that a model's logits and greedy tokens are
the same with it and without it. The conftest pins it on for up to 8 rows with no per-shape timing."""

from __future__ import annotations

import pytest
import torch

from engram_kernels.cpu_decode import decode_gemm_available
from model_worker.execution import cpu_gemm
from model_worker.execution import experts as experts_module
from model_worker.execution import gemm as linear_module
from model_worker.execution.cpu_gemm import set_cpu_gemm_preferences
from model_worker.execution.gemm import linear, linear_accumulate
from tests.conftest import PINNED_CPU_GEMM
from tests.model_worker.engine.engine_fixtures import greedy, make_engine, random_prompt, run_to_completion, tiny_model
from tests.model_worker.kernel_spies import pinned_cpu_gemm, spy_on
from tests.model_worker.test_fused_weights import _moe, _moe_reference

pytestmark = pytest.mark.skipif(not decode_gemm_available(), reason="no C decode kernel on this machine")


@pytest.fixture
def spy(monkeypatch):
    return spy_on(monkeypatch, linear_module, "decode_gemm")


@pytest.fixture
def native_off():
    with pinned_cpu_gemm(native_max_rows=0):
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_few_fp32_rows_through_an_output_major_weight_take_the_kernel(spy, rows):
    g = _gen(rows)
    weight, bias = torch.randn(96, 80, generator=g), torch.randn(96, generator=g)
    x = torch.randn(1, rows, 80, generator=g)
    want = x.double() @ weight.double().t()
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, weight).double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x, weight, bias).double(), want + bias.double(), rtol=1e-5, atol=1e-5)
        strided = linear(torch.randn(rows, 160, generator=g)[:, ::2], weight)  # x without unit stride: copied
    assert strided.shape == (rows, 96)
    assert spy.calls == 3


def test_other_products_keep_the_library_kernels(spy):
    g = _gen(1)
    weight = torch.randn(96, 80, generator=g)
    with torch.inference_mode():
        linear(torch.randn(9, 80, generator=g), weight)  # more rows than native_max_rows
        linear(torch.randn(2, 80, generator=g), weight.t().contiguous().t())  # input-major weight
        linear(torch.randn(2, 80, generator=g).half(), weight.half())  # fp16: no kernel for it
    assert spy.calls == 0
    trained = weight.clone().requires_grad_()
    x = torch.randn(2, 80, generator=g)
    linear(x, trained).sum().backward()  # a gradient is wanted: torch's kernel, and the gradient is right
    torch.testing.assert_close(trained.grad, x.sum(0).expand(96, 80))
    assert spy.calls == 0


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_rows_take_the_kernel_and_round_once_like_torch(spy, rows):
    g = _gen(rows + 40)
    weight = torch.randn(200, 136, generator=g).bfloat16()
    x = torch.randn(rows, 136, generator=g).bfloat16()
    with torch.inference_mode():
        got = linear(x, weight)
        accumulated = linear_accumulate(got, x, weight, 0.5)
    assert got.dtype == torch.bfloat16 and spy.calls == 2
    exact = x.double() @ weight.double().t()
    torch.testing.assert_close(got.double(), exact, rtol=8e-3, atol=8e-3)  # one bf16 rounding of an fp32 sum
    torch.testing.assert_close(accumulated.double(), got.double() + 0.5 * exact, rtol=1.6e-2, atol=1.6e-2)


def test_linear_accumulate_is_out_plus_alpha_times_the_product(spy):
    g = _gen(2)
    weight, x, out = torch.randn(64, 48, generator=g), torch.randn(3, 48, generator=g), torch.randn(3, 64, generator=g)
    before = out.clone()
    with torch.inference_mode():
        got = linear_accumulate(out, x, weight, 0.75)
    want = before.double() + 0.75 * (x.double() @ weight.double().t())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, before)  # a new tensor: the caller's `out` is not written
    assert spy.calls == 1


def test_the_measured_mode_times_the_kernel_per_shape_and_row_bucket_beyond_one_fp32_row(spy):
    with pinned_cpu_gemm(tune_native=True):
        weight = torch.randn(96, 80)
        for rows in (1, 3, 2):
            x = torch.randn(rows, 80)
            with torch.inference_mode():
                torch.testing.assert_close(linear(x, weight).double(), x.double() @ weight.double().t(),
                                           rtol=1e-5, atol=1e-5)
        # One fp32 row takes the kernel untimed (the host measurement chose it for that); 2-3 rows are timed.
        assert {key for key in cpu_gemm._choices if key[0] == "native"} == {("native", 96, 80, torch.float32, 2)}
        assert spy.calls >= 1
        with torch.inference_mode():
            linear(torch.randn(1, 80).bfloat16(), weight.bfloat16())  # bf16 is timed even at one row
        assert ("native", 96, 80, torch.bfloat16, 1) in cpu_gemm._choices


def test_an_output_major_model_computes_the_same_logits_and_tokens_with_and_without_the_kernel(spy, native_off):
    model = tiny_model(seed=21).arrange_weights(input_major=False)  # every weight in the order the kernel reads
    ids = torch.randint(5, model.config.vocab_size, (1, 1), generator=_gen(0))
    prompts = [random_prompt(9, seed) for seed in range(3)]

    def run():
        with torch.inference_mode():
            logits = model(ids)
        engine = make_engine(model, kv_cache_dtype="bf16")
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy(12))
        outputs = run_to_completion(engine)
        return logits, {rid: [t for out in outs for t in out.new_token_ids] for rid, outs in outputs.items()}

    library_logits, library_tokens = run()
    assert spy.calls == 0
    set_cpu_gemm_preferences(PINNED_CPU_GEMM)
    native_logits, native_tokens = run()
    assert spy.calls > 0
    torch.testing.assert_close(native_logits, library_logits, rtol=1e-5, atol=1e-5)
    assert native_tokens == library_tokens


@pytest.mark.parametrize("tokens,native", [(2, True), (8, True), (40, False)])
def test_moe_experts_run_in_two_grouped_kernel_calls_when_no_expert_has_more_rows_than_the_kernel_takes(
        monkeypatch, tokens, native):
    moe = _moe(seed=tokens)
    for fusion in (moe._stacked_gate_up, moe._stacked_down):
        fusion.input_major = False  # the order the kernel reads (arrange_weights does this where it wins)
        fusion.get()
    calls = spy_on(monkeypatch, experts_module, "grouped_decode_gemm")
    x = torch.randn(1, tokens, 64, generator=_gen(tokens))
    with torch.inference_mode():
        want = _moe_reference(moe, x[0])
        got = moe(x)
        busiest = int(torch.bincount(moe.gate(x[0])[1].flatten()).max())
    torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=1e-4)
    assert (busiest <= PINNED_CPU_GEMM.native_max_rows) == native
    assert calls.calls == (2 if native else 0)
