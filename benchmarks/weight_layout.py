"""Decode GEMM kernels for decode-sized batches: the evidence for the fixed rule of `execution.policy`.

Where our C kernels build, fp32 layers run our C panel kernel from panel-packed copies (`execution.panel_packs`)
at every row count, and a few bf16 rows run our C dot-product kernel; nothing else is chosen at run time. This
prints the evidence against every rival we had (torch's GEMM in both operand orders and both product forms,
oneDNN with packed weights, `onednn_peer.py`), in two parts, same weights, one process:

1. Per shape: for each distinct GEMM shape of the DeepSeek-V3-shaped benchmark model, at 1, 4 and 16
   rows in fp32, the product as x @ W^T (torch's default) and as (W @ x^T)^T, with the weight in either
   order, and through the weight's oneDNN-packed copy; in bf16 at one row the engine's GEMV in either
   order and the packed kernel; in both also our C dot-product kernel (`engram_kernels.cpu_decode`) on the
   output-major weight, and in fp32 our C panel kernel on the weight's panel-packed copy. Every call
   reads a different copy of the weight (copies add up to more than the caches), as a decode step does.
   Also the 256 MiB matrix-vector product `decode.py` uses for the bandwidth roofline, in both orders
   and through our two kernels.
2. Per step: our engine decoding with torch's kernels (`arrange_weights(pack=False)`: every layer's method
   is torch's) and as load_model gives it (this host's methods), alternating every few steps in one process
   (this host's speed drifts by tens of percent within seconds), at 1, 4 and 16 concurrent requests. Same
   greedy tokens expected (different rounding may in rare near-ties change one).

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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onednn_peer  # noqa: E402
from common import ByteTokenizer, machine_line, save_hf_v3  # noqa: E402

_CACHE_DEFEAT_BYTES = 512 * 2**20


def _orders(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"output-major": weight.contiguous(), "input-major": weight.t().contiguous().t()}


def _x_wt(x, w):
    return F.linear(x, w)  # torch's default: x @ W^T


def _w_xt(x, w):
    return torch.mm(w, x.t()).t()  # the weight as the tall left operand


def _gemv(x, w):
    return torch.mv(w, x[0])[None]  # one bf16 row as torch's matrix-vector product


def _c_kernel(x, w):
    from engram_kernels.cpu_decode import decode_gemm

    return decode_gemm(x, w)  # our C decode kernel (engram_kernels.cpu_decode), output-major weights only


def _panel(x, w):
    from engram_kernels.cpu_decode import panel_gemm

    packed, out_features = w  # the weight's panel-packed copy (engram_kernels.cpu_decode.panel_pack) and its rows
    return panel_gemm(x, packed, out_features)


def _packed(x, w):
    return onednn_peer.packed_linear(x, w)  # w is a packed copy (any source order gives the same packed copy)


def shape_seconds(out_features: int, in_features: int, rows: int, trials: int,
                  dtype: torch.dtype = torch.float32) -> dict[tuple[str, str], float]:
    """Median seconds per product of [rows, in] with an [out, in] weight in dtype, per (form, memory order).
    fp32: forms x @ W^T and (W @ x^T)^T; bf16: torch's one-row GEMV; both: the
    oneDNN-packed kernel, as ("packed", "packed") where this torch has it (`onednn_peer`), and our C
    decode kernel as ("C kernel", "output-major") where it builds (`engram_kernels.cpu_decode`); fp32: our C panel
    kernel on panel-packed copies as ("panel", "panel") there too."""
    from engram_kernels.cpu_decode import decode_gemm_available, panel_pack

    copies = max(2, _CACHE_DEFEAT_BYTES // (out_features * in_features * dtype.itemsize))
    weights = [_orders(torch.randn(out_features, in_features, dtype=dtype)) for _ in range(copies)]
    if onednn_peer.packable(weights[0]["output-major"]):
        for pair in weights:
            pair["packed"] = onednn_peer.pack_copy(pair["output-major"])
    x = torch.randn(rows, in_features, dtype=dtype)
    forms = {"x @ W^T": _x_wt, "(W @ x^T)^T": _w_xt} if dtype == torch.float32 else {"GEMV": _gemv}
    samples = {(form, order): [] for form in forms for order in ("output-major", "input-major")}
    if "packed" in weights[0]:
        forms["packed"] = _packed
        samples[("packed", "packed")] = []
    if decode_gemm_available():
        forms["C kernel"] = _c_kernel
        samples[("C kernel", "output-major")] = []
        if dtype == torch.float32:
            for pair in weights:
                pair["panel"] = (panel_pack(pair["output-major"]), out_features)
            forms["panel"] = _panel
            samples[("panel", "panel")] = []
    for _ in range(trials):
        for form, order in samples:
            start = time.perf_counter()
            for pair in weights:
                forms[form](x, pair[order])
            samples[(form, order)].append((time.perf_counter() - start) / copies)
    return {key: statistics.median(values) for key, values in samples.items()}


def bandwidth_by_order(trials: int) -> dict[str, float]:
    """GB/s of the 256 MiB fp32 matrix-vector product (decode.py's bandwidth probe): torch's in both orders,
    and where they build our C decode kernel on the output-major matrix ("C kernel") and our panel kernel on
    its panel-packed copy ("panel")."""
    from engram_kernels.cpu_decode import decode_gemm_available, panel_pack

    matrix = _orders(torch.randn(16384, 4096))
    vector = torch.randn(4096)
    products = {order: (lambda w=weight: w @ vector) for order, weight in matrix.items()}
    if decode_gemm_available():
        products["C kernel"] = lambda: _c_kernel(vector[None], matrix["output-major"])
        panels = (panel_pack(matrix["output-major"]), 16384)
        products["panel"] = lambda: _panel(vector[None], panels)
    samples = {name: [] for name in products}
    for _ in range(trials):
        for name, product in products.items():
            product()
            start = time.perf_counter()
            product()
            samples[name].append(16384 * 4096 * 4 / (time.perf_counter() - start) / 1e9)
    return {name: statistics.median(values) for name, values in samples.items()}


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


def step_seconds(variants: dict, concurrency: int, rounds: int, per_round: int = 3):
    """variants: name -> model. Median engine step seconds per variant, alternating; and whether all produced
    the same tokens."""
    from model_worker.engine.engine import EngineConfig, LLMEngine
    from model_worker.engine.sampling import SamplingParams

    vocab = next(iter(variants.values())).config.vocab_size
    params = SamplingParams(max_tokens=rounds * per_round + 8, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (16,), generator=gen).tolist() for _ in range(concurrency)]
    engines = {}
    for name, model in variants.items():
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

    from collections import Counter

    from model_worker import load_model
    from model_worker.execution.prepare import layer_methods

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_v3(Path(tmp))
        arranged = load_model(tmp)  # this host's methods
        torch_model = load_model(tmp, pack_weights=False)  # torch's kernels everywhere

    print("decode GEMM forms: fp32, DeepSeek-V3-shaped model; output-major = nn.Linear's [out, in] order, "
          "input-major = the same [out, in] tensor over [in, out] memory")
    print(machine_line())
    print(f"per shape: median us per product over {trials} alternating trials, each call on a different copy "
          f"(> {_CACHE_DEFEAT_BYTES >> 20} MiB of copies); out/in = output-/input-major weight")
    print(f"{'weight [out, in]':>18}{'rows':>6}{'x@W^T out':>11}{'x@W^T in':>10}{'(W@x^T)^T out':>15}"
          f"{'(W@x^T)^T in':>14}{'packed':>8}{'C kernel':>10}{'panel':>8}{'packed vs best torch':>22}"
          f"{'C kernel vs best library':>26}{'panel vs best other':>21}  {'best':<18}modules")
    columns = [("x @ W^T", "output-major"), ("x @ W^T", "input-major"), ("(W @ x^T)^T", "output-major"),
               ("(W @ x^T)^T", "input-major"), ("packed", "packed"), ("C kernel", "output-major"), ("panel", "panel")]
    for (out_f, in_f), kinds in decode_gemm_shapes(arranged).items():
        for rows in (1, 4, 16):
            t = shape_seconds(out_f, in_f, rows, trials)
            best = min(t, key=t.get)
            cells = "".join(f"{t[key] * 1e6:>{width}.1f}" if key in t else f"{'-':>{width}}"
                            for key, width in zip(columns, (11, 10, 15, 14, 8, 10, 8)))
            torch_best = min(value for key, value in t.items() if key[0] not in ("packed", "C kernel", "panel"))
            library_best = min(value for key, value in t.items() if key[0] not in ("C kernel", "panel"))
            other_best = min(value for key, value in t.items() if key[0] != "panel")
            panel_vs = f"{other_best / t[('panel', 'panel')]:.2f}x faster" if ("panel", "panel") in t else "-"
            vs = f"{torch_best / t[('packed', 'packed')]:.2f}x faster" if ("packed", "packed") in t else "-"
            c_vs = f"{library_best / t[('C kernel', 'output-major')]:.2f}x faster" \
                if ("C kernel", "output-major") in t else "-"
            label = best[0] if best[0] in ("packed", "C kernel", "panel") else \
                f"{'x@W^T' if best[0] == 'x @ W^T' else '(W@x^T)^T'} {best[1][:-6]}"
            print(f"{f'[{out_f}, {in_f}]':>18}{rows:>6}{cells}{vs:>22}{c_vs:>26}{panel_vs:>21}  {label:<18}"
                  f"{', '.join(kinds)}")
    print("bf16, one row: the engine's unpacked GEMV in either order, the packed kernel and our C kernel:")
    for (out_f, in_f), kinds in decode_gemm_shapes(arranged).items():
        t = shape_seconds(out_f, in_f, 1, trials, torch.bfloat16)
        out_us, in_us = t[("GEMV", "output-major")] * 1e6, t[("GEMV", "input-major")] * 1e6
        packed_us = t[("packed", "packed")] * 1e6 if ("packed", "packed") in t else float("nan")
        c_us = t[("C kernel", "output-major")] * 1e6 if ("C kernel", "output-major") in t else float("nan")
        print(f"{f'[{out_f}, {in_f}]':>18}{1:>6}  output-major {out_us:.1f} us, input-major {in_us:.1f} us "
              f"({in_us / out_us:.2f}x as long), packed {packed_us:.1f} us ({out_us / packed_us:.2f}x faster than "
              f"output-major), C kernel {c_us:.1f} us ({packed_us / c_us:.2f}x faster than packed)  "
              f"{', '.join(kinds)}")
    bw = bandwidth_by_order(trials)
    print("256 MiB fp32 matrix-vector product (decode.py's bandwidth probe): "
          + ", ".join(f"{name} {value:.1f} GB/s" for name, value in bw.items()))
    print(f"this host's layer methods (execution.policy): {dict(Counter(layer_methods(arranged).values()))}")
    print(f"per step: median ms per engine decode step, {rounds} rounds of 3 steps each, alternating; torch = "
          "arrange_weights(pack=False) (torch's kernels in every layer); ours = what load_model gives")
    print(f"{'concurrent':>10}{'torch':>9}{'ours':>8}{'ours vs torch':>15}  same tokens")
    for concurrency in (1, 4, 16):
        seconds, same = step_seconds({"torch": torch_model, "ours": arranged}, concurrency, rounds)
        print(f"{concurrency:>10}{seconds['torch'] * 1e3:>9.2f}{seconds['ours'] * 1e3:>8.2f}"
              f"{seconds['torch'] / seconds['ours']:>14.2f}x  {same}")


if __name__ == "__main__":
    main()
