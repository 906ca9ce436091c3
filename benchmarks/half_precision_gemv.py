"""Batch-1 decode of a bf16 model: one-row projections as torch's GEMV (what `layers.linear.linear` does)
against the same projections as one-row GEMMs (`F.linear`, the path before it).

One engine, one model (~100M parameters, DeepSeek-V3-shaped, bf16 weights), one request at a time,
greedy. The two paths alternate every 5 decode steps in the same process, so the host's drift (tens of
percent over seconds here) hits both alike. Reported: median step time of each path and their ratio.

    python benchmarks/half_precision_gemv.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ByteTokenizer, machine_line, save_hf_v3  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 100 if args.quick else 400

    import model_worker.layers.linear as linear_module
    from model_worker import load_model
    from model_worker.engine.engine import EngineConfig, LLMEngine
    from model_worker.engine.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_v3(Path(tmp))
        model = load_model(tmp).cast(torch.bfloat16)
    engine = LLMEngine(model, ByteTokenizer(model.config.vocab_size), EngineConfig())
    gemv_rule = linear_module._one_half_precision_row_on_cpu
    paths = {"GEMV (ours)": gemv_rule, "one-row GEMM": lambda x, weight: False}
    times: dict[str, list[float]] = {name: [] for name in paths}
    gen = torch.Generator().manual_seed(1)
    done = 0
    try:
        while done < steps:
            prompt = torch.randint(0, model.config.vocab_size, (16,), generator=gen).tolist()
            engine.add_request(f"r{done}", prompt, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
            engine.step()  # prefill, not timed
            while engine.has_unfinished() and done < steps:
                name = list(paths)[(done // 5) % len(paths)]
                linear_module._one_half_precision_row_on_cpu = paths[name]
                start = time.perf_counter()
                engine.step()
                times[name].append(time.perf_counter() - start)
                done += 1
    finally:
        linear_module._one_half_precision_row_on_cpu = gemv_rule

    print(f"batch-1 decode, DeepSeek-V3-shaped model, bf16 weights, {steps} steps, paths alternating every 5")
    print(machine_line())
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:>14}: median step {median * 1e3:.2f} ms ({1 / median:.1f} tok/s)")
    print(f"GEMM / GEMV step time: {medians['one-row GEMM'] / medians['GEMV (ours)']:.2f}x")


if __name__ == "__main__":
    main()
