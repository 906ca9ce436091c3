"""Kernel choices are made once per host: two separate processes on one machine, both measuring (nothing
pinned), run the same kernels and give the same tokens and bit-identical logits for the same prompts and
seeds; a recorded choice is what a later process uses, and a damaged record is measured again."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model_worker.execution.cpu_gemm import TORCH_DEFAULTS

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300

GENERATE = """
import hashlib, json, torch
from model_worker.engine.sampling import SamplingParams
from model_worker.execution import cpu_gemm
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
                  "preferences": cpu_gemm.cpu_gemm_preferences().__dict__,
                  "choices": sorted(map(repr, cpu_gemm._choices))}))
"""


def _run(cache: Path, code: str = GENERATE, **env) -> dict:
    from engram_kernels.cpu_decode import native

    native.load()  # built once for this host, then copied: a fresh cache dir would compile the C kernels again
    for built in native.cache_dir().glob("*.so"):
        if not (cache / built.name).exists():
            shutil.copy2(built, cache / built.name)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
    environment.update(ENGRAM_KERNEL_CACHE=str(cache), PYTHONPATH=str(REPO), **env)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _choice_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("cpu-gemm-choices-*.json"))


def test_two_processes_on_one_host_give_identical_tokens_and_logits(tmp_path):
    first = _run(tmp_path)
    (record,) = _choice_files(tmp_path)
    recorded = json.loads(record.read_text())
    assert "preferences" in recorded  # the first process measured and recorded
    second = _run(tmp_path)
    assert second == first  # same kernels chosen, same tokens, same logits bit for bit
    assert json.loads(record.read_text()) == recorded  # the second measured nothing new


def test_a_recorded_choice_is_what_a_later_process_uses(tmp_path):
    _run(tmp_path, "from model_worker.execution import cpu_gemm; import json; "
                   "print(json.dumps(cpu_gemm.cpu_gemm_preferences().__dict__))")
    (record,) = _choice_files(tmp_path)
    record.write_text(json.dumps({"preferences": dataclasses.asdict(TORCH_DEFAULTS)}))
    used = _run(tmp_path, "from model_worker.execution import cpu_gemm; import json; "
                          "print(json.dumps(cpu_gemm.cpu_gemm_preferences().__dict__))")
    assert used == dataclasses.asdict(TORCH_DEFAULTS)


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", ""])
def test_a_damaged_record_is_measured_again_and_rewritten(tmp_path, damage):
    code = ("from model_worker.execution import cpu_gemm; import json; "
            "print(json.dumps(cpu_gemm.cpu_gemm_preferences().__dict__))")
    _run(tmp_path, code)
    (record,) = _choice_files(tmp_path)
    record.write_text(damage)
    _run(tmp_path, code)
    assert "preferences" in json.loads(record.read_text())


def test_the_cache_can_be_switched_off(tmp_path):
    _run(tmp_path, "from model_worker.execution import cpu_gemm; print('{}'); cpu_gemm.cpu_gemm_preferences()",
         ENGRAM_CPU_GEMM_CACHE="off")
    assert _choice_files(tmp_path) == []
