"""Each layer's method is chosen once, at load, by a fixed rule (`model_worker.execution.policy`): what the
loaded model runs is the same in every process (two separate processes give the same tokens and bit-identical
logits), every method computes what the reference torch method does, and ENGRAM_CPU_GEMM=torch or
pack_weights=False give torch's kernels everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from engram_kernels.cpu_decode import decode_gemm_available
from model_worker.execution import policy
from model_worker.execution.linear_methods import C_ROWS, PANEL, REFERENCE, method_for
from model_worker.execution.prepare import layer_methods
from model_worker.layers.linear import Linear
from tests.model_worker.engine.engine_fixtures import random_prompt, tiny_model

REPO = Path(__file__).resolve().parents[2]
needs_c_kernels = pytest.mark.skipif(not decode_gemm_available(), reason="our C kernels do not build here")

GENERATE = """
import hashlib, json, torch
from model_worker.engine.sampling import SamplingParams
from model_worker.execution.prepare import layer_methods
from tests.model_worker.engine.engine_fixtures import (make_engine, random_prompt, run_to_completion, tiny_model,
                                                      tokens_of)

model = tiny_model(seed=5)
engine = make_engine(model)
for i in range(3):
    engine.add_request(f"r{i}", random_prompt(20 + 9 * i, seed=i), SamplingParams(max_tokens=12, temperature=0.8,
                                                                                  seed=100 + i, ignore_eos=True))
outputs = run_to_completion(engine)
with torch.inference_mode():
    logits = model(torch.tensor([random_prompt(40, seed=9)]))
print(json.dumps({"tokens": {k: tokens_of(v) for k, v in sorted(outputs.items())},
                  "logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
                  "methods": layer_methods(model)}))
"""


def _run(**env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != policy.CPU_GEMM_ENV}
    environment.update(PYTHONPATH=str(REPO), **env)
    done = subprocess.run([sys.executable, "-c", GENERATE], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_processes_on_one_host_give_identical_tokens_and_logits():
    first, second = _run(), _run()
    assert second == first  # same methods, same tokens, same logits bit for bit
    assert len(first["tokens"]) == 3 and all(len(t) == 12 for t in first["tokens"].values())
    expected = "c-panel" if decode_gemm_available() else "torch"
    assert first["methods"]["lm_head"] == expected
    forced = _run(**{policy.CPU_GEMM_ENV: "torch"})
    assert set(forced["methods"].values()) == {"torch"}


@needs_c_kernels
def test_methods_are_chosen_at_load_by_dtype_and_device():
    model = tiny_model(seed=1)  # loaded: arranged for this host
    methods = layer_methods(model)
    counts = Counter(methods.values())
    assert set(counts) == {"c-panel", "torch"}, counts
    # the fused q_a/kv_a, the experts' stacks and the head run by our panel kernel; the fused members and
    # kv_b (read per head by the absorbed attention) keep torch's
    assert methods["lm_head"] == "c-panel"
    assert any(name.endswith("._q_a_kv_a") and m == "c-panel" for name, m in methods.items())
    assert any(name.endswith(".experts") and m == "c-panel" for name, m in methods.items())
    assert all(m == "torch" for name, m in methods.items() if name.endswith("kv_b_proj"))
    assert not any(name.endswith(("q_a_proj", "experts.0.down_proj")) for name in methods)  # run inside fusions
    assert set(layer_methods(model.arrange_weights(pack=False)).values()) == {"torch"}
    assert method_for(torch.zeros(4, 4, dtype=torch.bfloat16)) is C_ROWS
    assert method_for(torch.zeros(4, 4)) is PANEL
    assert method_for(torch.zeros(4, 4, dtype=torch.float16)) is REFERENCE


def test_forced_torch_mode_and_an_unknown_mode():
    policy.set_cpu_gemm_mode("torch")
    try:
        assert method_for(torch.zeros(4, 4)) is REFERENCE
        assert set(layer_methods(tiny_model(seed=2)).values()) == {"torch"}
    finally:
        policy.set_cpu_gemm_mode(None)
    with pytest.raises(ValueError, match="ours, torch"):
        policy.set_cpu_gemm_mode("measure")


def test_every_method_matches_the_reference_logits_and_a_cast_rechooses():
    ids = torch.tensor([random_prompt(23, seed=4), random_prompt(23, seed=5)])
    model = tiny_model(seed=7)
    with torch.inference_mode():
        ours = model(ids)
        model.arrange_weights(pack=False)
        reference = model(ids)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        model.cast(torch.bfloat16)  # cast arranges again: bf16 layers get bf16 methods
        methods = set(layer_methods(model).values())
        assert methods == ({"c-rows", "torch"} if decode_gemm_available() else {"torch"})
        bf16 = model(ids)
        model.arrange_weights(pack=False)
        torch.testing.assert_close(bf16, model(ids), rtol=2e-2, atol=2e-2)


def test_a_linear_runs_by_its_method_and_fp8_by_the_block_method():
    layer = Linear(64, 32)
    x = torch.randn(3, 64)
    assert layer.method is REFERENCE
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight))
    from engram_kernels.quant import quantize_fp8_weight_ref

    weight_q, scale = quantize_fp8_weight_ref(layer.weight.detach(), block=128)
    layer.to_fp8(weight_q, scale)
    assert layer.method.name == "fp8-block"
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.dense_weight()), rtol=0.1, atol=0.1)
    with pytest.raises(TypeError, match="block scales"):
        layer.method.run(x, layer.weight)
