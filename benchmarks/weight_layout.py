"""Decode weight layout: output-major (nn.Linear's order) against input-major, same weights, same process.

`CausalLM.arrange_weights` stores fp32 weights with out >= in input-major on CPU (`layers.layout`). This
prints the evidence behind that rule, in two parts:

1. Per shape: the engine's projection time for each distinct GEMM shape of the DeepSeek-V3-shaped
   benchmark model, at 1 and 16 rows in fp32 and at 1 row in bf16, with each weight in either order.
   Every call reads a different copy of the weight (copies add up to more than the caches), as a decode
   step does. Also the 256 MiB matrix-vector
   product `decode.py` uses for the bandwidth roofline, in both orders.
2. Per step: our engine decoding with the model arranged (the default) and with every weight
   output-major (`arrange_weights(input_major=False)`), alternating every few steps in one process (this
   host's speed drifts by tens of percent within seconds), at 1 and 16 concurrent requests. The two must
   produce the same greedy tokens.

    python benchmarks/weight_layout.py [--quick]
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

_CACHE_DEFEAT_BYTES = 512 * 2**20


def _orders(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"output-major": weight.contiguous(), "input-major": weight.t().contiguous().t()}


def shape_seconds(out_features: int, in_features: int, rows: int, trials: int,
                  dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Median seconds per `layers.linear.linear` (the engine's projection: F.linear, or torch's GEMV for one
    half-precision row) of [rows, in] with an [out, in] weight in dtype, per memory order."""
    from model_worker.layers.linear import linear

    copies = max(2, _CACHE_DEFEAT_BYTES // (out_features * in_features * dtype.itemsize))
    weights = [_orders(torch.randn(out_features, in_features, dtype=dtype)) for _ in range(copies)]
    x = torch.randn(rows, in_features, dtype=dtype)
    samples = {order: [] for order in weights[0]}
    for _ in range(trials):
        for order in samples:
            start = time.perf_counter()
            for pair in weights:
                linear(x, pair[order])
            samples[order].append((time.perf_counter() - start) / copies)
    return {order: statistics.median(values) for order, values in samples.items()}


def bandwidth_by_order(trials: int) -> dict[str, float]:
    """GB/s of the 256 MiB fp32 matrix-vector product (decode.py's bandwidth probe) in both orders."""
    matrix = _orders(torch.randn(16384, 4096))
    vector = torch.randn(4096)
    samples = {order: [] for order in matrix}
    for _ in range(trials):
        for order, weight in matrix.items():
            weight @ vector
            start = time.perf_counter()
            weight @ vector
            samples[order].append(weight.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return {order: statistics.median(values) for order, values in samples.items()}


def decode_gemm_shapes(model) -> dict[tuple[int, int], list[str]]:
    """(out, in) -> module kinds, for every weight a decode step runs as a GEMM (fusions as one)."""
    shapes: dict[tuple[int, int], list[str]] = {}

    def add(shape, kind):
        kinds = shapes.setdefault(tuple(shape), [])
        if kind not in kinds:
            kinds.append(kind)

    layer0, moe = model.model.layers[0], model.model.layers[1]
    attn = layer0.self_attn
    add(attn._q_a_kv_a.get()[0].shape, "q_a+kv_a")
    add(attn.q_b_proj.weight.shape, "q_b")
    add(attn.o_proj.weight.shape, "o_proj")
    add(layer0.mlp._gate_up.get()[0].shape, "dense gate+up")
    add(layer0.mlp.down_proj.weight.shape, "dense down")
    add(moe.mlp._stacked_gate_up.get()[0].shape, "expert gate+up")
    add(moe.mlp._stacked_down.get()[0].shape, "expert down")
    add(moe.mlp.shared_experts._gate_up.get()[0].shape, "shared gate+up")
    add(moe.mlp.shared_experts.down_proj.weight.shape, "shared down")
    add(model.lm_head.weight.shape, "LM head")
    return shapes


def step_seconds(models: dict, concurrency: int, rounds: int, per_round: int = 3):
    """Median engine step seconds per model, alternating; and whether all produced the same tokens."""
    from model_worker.engine.engine import EngineConfig, LLMEngine
    from model_worker.engine.sampling import SamplingParams

    vocab = next(iter(models.values())).config.vocab_size
    params = SamplingParams(max_tokens=rounds * per_round + 8, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (16,), generator=gen).tolist() for _ in range(concurrency)]
    engines = {}
    for name, model in models.items():
        engines[name] = LLMEngine(model, ByteTokenizer(vocab), EngineConfig(max_num_seqs=max(64, concurrency)))
        for i, prompt in enumerate(prompts):
            engines[name].add_request(f"r{i}", prompt, params)
        engines[name].step()  # prefill
    samples = {name: [] for name in engines}
    tokens = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            for _ in range(per_round):
                start = time.perf_counter()
                outputs = engine.step()
                samples[name].append(time.perf_counter() - start)
                tokens[name].append(sorted((out.request_id, out.new_token_ids) for out in outputs))
    same = len({repr(t) for t in tokens.values()}) == 1
    return {name: statistics.median(values) for name, values in samples.items()}, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    trials, rounds = (3, 8) if args.quick else (7, 25)

    from model_worker import load_model

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_v3(Path(tmp))
        arranged = load_model(tmp)
        output_major = load_model(tmp).arrange_weights(input_major=False)

    print("decode weight layout: fp32, DeepSeek-V3-shaped model; output-major = nn.Linear's [out, in] order, "
          "input-major = the same [out, in] tensor over [in, out] memory")
    print(machine_line())
    print(f"per shape: median us per projection over {trials} alternating trials, each call on a different copy "
          f"(> {_CACHE_DEFEAT_BYTES >> 20} MiB of copies)")
    print(f"{'weight [out, in]':>18}{'rows':>6}{'output-major us':>17}{'input-major us':>16}{'speed-up':>10}"
          f"{'arranged':>14}  modules")
    for (out_f, in_f), kinds in decode_gemm_shapes(arranged).items():
        chosen = "input-major" if out_f >= in_f else "output-major"
        for rows in (1, 16):
            t = shape_seconds(out_f, in_f, rows, trials)
            print(f"{f'[{out_f}, {in_f}]':>18}{rows:>6}{t['output-major'] * 1e6:>17.1f}{t['input-major'] * 1e6:>16.1f}"
                  f"{t['output-major'] / t['input-major']:>9.2f}x{chosen:>14}  {', '.join(kinds)}")
    print("bf16 (kept output-major), one row:")
    for (out_f, in_f), kinds in decode_gemm_shapes(arranged).items():
        t = shape_seconds(out_f, in_f, 1, trials, torch.bfloat16)
        print(f"{f'[{out_f}, {in_f}]':>18}{1:>6}{t['output-major'] * 1e6:>17.1f}{t['input-major'] * 1e6:>16.1f}"
              f"{t['output-major'] / t['input-major']:>9.2f}x{'output-major':>14}  {', '.join(kinds)}")
    bw = bandwidth_by_order(trials)
    print(f"256 MiB fp32 matrix-vector product (decode.py's bandwidth probe): output-major {bw['output-major']:.1f} "
          f"GB/s, input-major {bw['input-major']:.1f} GB/s")
    print(f"per step: median ms per engine decode step, {rounds} rounds of 3 steps each, alternating")
    print(f"{'concurrent':>10}{'all output-major':>18}{'arranged':>10}{'speed-up':>10}  same tokens")
    for concurrency in (1, 16):
        seconds, same = step_seconds({"output-major": output_major, "arranged": arranged}, concurrency, rounds)
        print(f"{concurrency:>10}{seconds['output-major'] * 1e3:>18.2f}{seconds['arranged'] * 1e3:>10.2f}"
              f"{seconds['output-major'] / seconds['arranged']:>9.2f}x  {same}")


if __name__ == "__main__":
    main()
