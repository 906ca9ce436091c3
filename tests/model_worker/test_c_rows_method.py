"""The C_ROWS linear method (`model_worker.execution.linear_methods`): up to C_ROWS_MAX_ROWS rows through our C
dot-product kernel (a spy counts its calls), equal to float64; everything else through torch's kernel; and a
bf16 model's logits and greedy tokens the same with it as with torch's kernels."""

from __future__ import annotations

import pytest
import torch

from engram_kernels.cpu_decode import decode_gemm_available
from model_worker.execution import linear_methods
from model_worker.execution.linear_methods import C_ROWS
from model_worker.execution.policy import C_ROWS_MAX_ROWS
from model_worker.execution.prepare import layer_methods
from tests.model_worker.engine.engine_fixtures import greedy, make_engine, random_prompt, run_to_completion, tiny_model
from tests.model_worker.kernel_spies import spy_on

pytestmark = pytest.mark.skipif(not decode_gemm_available(), reason="no C decode kernel on this machine")


@pytest.fixture
def spy(monkeypatch):
    return spy_on(monkeypatch, linear_methods, "decode_gemm")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [1, 2, 5, C_ROWS_MAX_ROWS])
def test_few_rows_take_the_kernel(spy, rows):
    g = _gen(rows)
    weight, bias = torch.randn(96, 80, generator=g), torch.randn(96, generator=g)
    x = torch.randn(1, rows, 80, generator=g)
    want = x.double() @ weight.double().t()
    with torch.inference_mode():
        torch.testing.assert_close(C_ROWS.run(x, weight).double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(C_ROWS.run(x, weight, bias).double(), want + bias.double(), rtol=1e-5, atol=1e-5)
        strided = C_ROWS.run(torch.randn(rows, 160, generator=g)[:, ::2], weight)  # x without unit stride: copied
    assert strided.shape == (rows, 96)
    assert spy.calls == 3


def test_other_products_run_torchs_kernel(spy):
    g = _gen(1)
    weight = torch.randn(96, 80, generator=g)
    with torch.inference_mode():
        for x, w in ((torch.randn(C_ROWS_MAX_ROWS + 1, 80, generator=g), weight),  # too many rows
                     (torch.randn(2, 80, generator=g), weight.t().contiguous().t()),  # input-major weight
                     (torch.randn(2, 80, generator=g).half(), weight.half())):  # fp16: no kernel for it
            torch.testing.assert_close(C_ROWS.run(x, w), torch.nn.functional.linear(x, w))
    assert spy.calls == 0
    trained = weight.clone().requires_grad_()
    x = torch.randn(2, 80, generator=g)
    C_ROWS.run(x, trained).sum().backward()  # a gradient is wanted: torch's kernel, and the gradient is right
    torch.testing.assert_close(trained.grad, x.sum(0).expand(96, 80))
    assert spy.calls == 0


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_rows_round_once_like_torch_and_accumulate(spy, rows):
    g = _gen(rows + 40)
    weight = torch.randn(200, 136, generator=g).bfloat16()
    x = torch.randn(rows, 136, generator=g).bfloat16()
    out = torch.randn(rows, 200, generator=g).bfloat16()
    before = out.clone()
    with torch.inference_mode():
        got = C_ROWS.run(x, weight)
        accumulated = C_ROWS.accumulate(out, x, weight, 0.5)
    assert got.dtype == torch.bfloat16 and spy.calls == 2
    exact = x.double() @ weight.double().t()
    torch.testing.assert_close(got.double(), exact, rtol=8e-3, atol=8e-3)  # one bf16 rounding of an fp32 sum
    torch.testing.assert_close(accumulated.double(), before.double() + 0.5 * exact, rtol=1.6e-2, atol=1.6e-2)
    assert torch.equal(out, before)  # a new tensor: the caller's `out` is not written


def test_a_bf16_model_gives_the_same_logits_and_tokens_with_the_kernel_as_with_torchs(spy):
    model = tiny_model(seed=21).cast(torch.bfloat16)
    assert "c-rows" in set(layer_methods(model).values())
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

    ours_logits, ours_tokens = run()
    assert spy.calls > 0
    calls = spy.calls
    model.arrange_weights(pack=False)
    torch_logits, torch_tokens = run()
    assert spy.calls == calls
    torch.testing.assert_close(ours_logits, torch_logits, rtol=2e-2, atol=2e-2)
    assert ours_tokens == torch_tokens
