"""Decode throughput: our engine vs transformers' `generate`, and against the memory-bandwidth roofline.

Same DeepSeek-V3-shaped weights (~100M parameters; fp32, or bf16 with --weights bf16) for both. Each
of C concurrent requests has a short random prompt and generates N tokens greedily (EOS ignored).
Reported: generated tokens/s of ours (bf16 and FP8 latent cache) and of transformers' `generate` at
the same batch size, the ratio, and at concurrency 1 the fraction of the roofline: this machine's
weight-read bandwidth (a large fp32 matrix-vector product) divided by the weight bytes one decode token
reads (embedding row, attention, dense/shared MLPs, the routed experts it uses, LM head). The bandwidth is
the fastest of torch's matrix-vector product and our two C kernels' (dot-product and panel) on a 256 MiB
matrix; the ratio against torch's alone is printed too. Peak RSS last.

This machine's speed drifts by tens of percent over seconds (shared host), so every figure is the median
of several trials, and the trials of ours and transformers alternate. At concurrency 1 each trial
measures the bandwidth right before our run, and ours/roofline is the median of the per-trial ratios.

The GEMM-only ceiling column bounds what this engine's kernels allow here (`gemm_floor_tokens_per_s`); the
memory bound is the weight bytes a step must read (`step_weight_bytes`) at the measured bandwidth, a
physical bound for any engine on this machine; the compute bound is the fastest GEMM rate we measure
here on a compute-bound shape (`matmul_flops`) over the multiply-adds a token needs.

    python benchmarks/decode.py [--quick] [--weights fp32|bf16] [--trials N]
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
from common import ByteTokenizer, machine_line, median_time, peak_rss_mib, save_hf_v3  # noqa: E402


def weight_read_bandwidths(mib: int = 256) -> dict[str, float]:
    """Bytes/s of an fp32 matrix-vector product over a matrix much larger than the caches: "torch" is the
    faster of torch's product on the matrix stored row-major and stored transposed (our weights use both
    orders, `execution.layout`), "ours" the faster of our C kernels (`engram_kernels.cpu_decode`: the dot-product one on
    the row-major matrix, the panel one on its panel-packed copy) where they build. The roofline uses the
    faster of the two, so that no kernel of ours reads faster than the bound it is held to; the torch-only
    figure is printed beside it."""
    from engram_kernels.cpu_decode import decode_gemm, decode_gemm_available, panel_gemm, panel_pack

    cols = 4096
    rows = mib * 2**20 // (4 * cols)
    matrix, vector = torch.randn(rows, cols), torch.randn(cols)
    speeds = {}
    if decode_gemm_available():
        one_row, panels = vector[None], panel_pack(matrix)
        seconds = min(median_time(lambda: decode_gemm(one_row, matrix), repeats=7, warmup=2),
                      median_time(lambda: panel_gemm(one_row, panels, rows), repeats=7, warmup=2))
        speeds["ours"] = matrix.numel() * 4 / seconds
        del panels
    seconds = median_time(lambda: matrix @ vector, repeats=7, warmup=2)
    matrix = matrix.t().contiguous().t()  # same values, column-major
    seconds = min(seconds, median_time(lambda: matrix @ vector, repeats=7, warmup=2))
    speeds["torch"] = matrix.numel() * 4 / seconds
    return speeds


def matmul_flops(dtype: torch.dtype = torch.float32, rows: int = 256) -> float:
    """FLOP/s of this machine's fastest library GEMM kernel (torch's own or oneDNN with a packed weight,
    `onednn_peer`) on a compute-bound shape: `rows` rows through a 4096 x 4096 weight in dtype, so the
    weight is reused `rows` times and memory is not the limit (the compute ceiling of decode at any batch)."""
    import onednn_peer

    a, w = torch.randn(rows, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    seconds = median_time(lambda: a @ w, repeats=7, warmup=2)
    if onednn_peer.packable(w):
        packed = onednn_peer.pack_copy(w)
        seconds = min(seconds, median_time(lambda: onednn_peer.packed_linear(a, packed), repeats=7, warmup=2))
    return 2 * a.shape[0] * w.numel() / seconds


def active_bytes_per_token(model) -> int:
    """fp32 weight bytes one decode token reads: everything but the embedding table (one row) and the
    routed experts it does not use."""
    cfg = model.config
    total = 0
    for name, param in model.named_parameters():
        if "embed_tokens" in name:
            total += param.shape[1] * param.element_size()
        elif ".mlp.experts." in name:
            total += param.numel() * param.element_size() * cfg.num_experts_per_tok / cfg.n_routed_experts
        else:
            total += param.numel() * param.element_size()
    return int(total)


def _routed_expert(name: str) -> bool:
    """Whether a `CausalLM.decode_gemm_weights` name is a routed expert's weight (a MoE stack's group)."""
    return "._stacked_" in name


def step_weight_bytes(model, concurrency: int) -> float:
    """Weight bytes a decode step over `concurrency` tokens must read at least once: every GEMM weight but the
    routed experts, plus the expected share of experts any token picks, E * (1 - (1 - k/E)^C) of E, if the
    router spread tokens uniformly; plus one embedding row per token."""
    cfg = model.config
    weights = model.decode_gemm_weights()
    expert_bytes = sum(w.numel() * w.element_size() for name, w in weights if _routed_expert(name))
    other = sum(w.numel() * w.element_size() for name, w in weights if not _routed_expert(name))
    used = 1.0
    if cfg.n_routed_experts:
        used = 1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** concurrency
    embed = model.model.embed_tokens.weight
    return other + expert_bytes * used + concurrency * embed.shape[1] * embed.element_size()


def gemm_floor_tokens_per_s(model, concurrency: int, repeats: int = 5) -> float:
    """Decode tokens/s if a step cost nothing but its weight GEMMs, with this engine's own kernels.

    One pass runs every weight of `CausalLM.decode_gemm_weights` once, in model order, through the engine's
    linear method for it here (`execution.linear_methods.method_for`: our C kernels or torch's) on [C, in]
    random rows: C = concurrency for attention, dense MLPs, shared experts and
    the head; for the routed experts the step's C * k (token, expert) pairs spread evenly over the E
    experts (only C * k experts, one row each, when C * k < E), in one grouped call per stack where the
    engine makes one (panel-packed stacks, `execution.experts`). The embedding gather, attention over the cache,
    routing, norms, sampling and the engine are left out, so no decode step of this engine at this
    concurrency can be faster than this on this machine. Median pass time over `repeats`.
    """
    from engram_kernels.cpu_decode import grouped_panel_gemm
    from model_worker.execution.linear_methods import PANEL, method_for

    cfg = model.config
    pairs = concurrency * (cfg.num_experts_per_tok or 0)
    per_expert = max(1, round(pairs / cfg.n_routed_experts)) if cfg.n_routed_experts else 0
    work = []  # (call(x), x's shape and dtype)
    grouped = set()  # expert stacks already in `work` as one grouped call
    for name, weight in model.decode_gemm_weights():
        if not _routed_expert(name):
            work.append((lambda x, w=weight: method_for(w).run(x, w), (concurrency, weight.shape[1], weight.dtype)))
            continue
        expert = int(name.rsplit("[", 1)[1].rstrip("]"))
        if pairs < cfg.n_routed_experts and expert >= pairs:
            continue  # this expert gets no token in the step
        module, attr = name.rsplit("[", 1)[0].rsplit(".", 1)
        stack = getattr(model.get_submodule(module), attr).get()  # [E, out, in]
        panel = PANEL.panel_for(torch.zeros(1, stack.shape[2], dtype=stack.dtype), stack)
        if panel is None:  # the engine runs these experts one by one
            work.append((lambda x, w=weight: method_for(w).run(x, w), (per_expert, weight.shape[1], weight.dtype)))
        elif name.rsplit("[", 1)[0] not in grouped:  # the engine's grouped call over all the stack's experts
            grouped.add(name.rsplit("[", 1)[0])
            used = min(pairs, stack.shape[0])
            offsets = [min(e, used) * per_expert for e in range(stack.shape[0] + 1)]
            work.append((lambda x, p=panel, o=offsets, n=stack.shape[1]: grouped_panel_gemm(x, o, p, n),
                         (offsets[-1], stack.shape[2], stack.dtype)))
    inputs = {shape: torch.randn(shape[:2], dtype=shape[2]) for _, shape in work}

    def one_pass():
        for call, shape in work:
            call(inputs[shape])

    with torch.inference_mode():
        return concurrency / median_time(one_pass, repeats=repeats, warmup=1)


# The benchmark architecture shrunk until its GEMMs cost next to nothing: same layers, routing and engine.
_TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, q_lora_rank=32,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


def step_overhead_seconds(tiny, concurrency: int, new_tokens: int) -> float:
    """Seconds per decode step of our engine on `tiny`, a copy of the architecture shrunk to hidden 64 and
    vocab 1000 (`_TINY`): the cost of the step's op graph itself (Python, op dispatch, sampling,
    scheduling), which a step of the real model pays on top of its GEMMs."""
    tokens_per_s = ours_tokens_per_s(tiny, ByteTokenizer(_TINY["vocab_size"]), concurrency, new_tokens, "bf16")
    return concurrency / tokens_per_s


def ours_tokens_per_s(model, tokenizer, concurrency: int, new_tokens: int, kv_dtype: str) -> float:
    from model_worker.engine.engine import EngineConfig, LLMEngine
    from model_worker.engine.sampling import SamplingParams

    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_dtype=kv_dtype, max_num_seqs=max(64, concurrency)))
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = [torch.randint(0, model.config.vocab_size, (16,), generator=gen).tolist() for _ in range(concurrency)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"w{i}", prompt, params)
    while engine.has_unfinished():  # warm-up run, also fills the batch
        engine.step()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    engine.step()  # prefill step (excluded: this measures decode)
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(out.new_token_ids) for out in engine.step())
    return produced / (time.perf_counter() - start)


def transformers_tokens_per_s(hf_model, concurrency: int, new_tokens: int, vocab: int) -> float:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (concurrency, 16), generator=gen)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf_model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        first = time.perf_counter()
        hf_model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill = time.perf_counter() - first
        start = time.perf_counter()
        hf_model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - start - prefill
    return concurrency * (new_tokens - 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                        help="weight dtype of both models")
    parser.add_argument("--trials", type=int, default=None, help="trials per figure (default 5, 3 with --quick)")
    args = parser.parse_args()
    new_tokens = 16 if args.quick else 64
    levels = [1, 16] if args.quick else [1, 16, 64]
    trials = args.trials or (3 if args.quick else 5)

    from model_worker import load_model

    with tempfile.TemporaryDirectory() as tmp:
        hf_model = save_hf_v3(Path(tmp))
        ours = load_model(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_v3(Path(tmp), **_TINY)
        tiny = load_model(tmp)
    if args.weights == "bf16":
        hf_model, ours = hf_model.to(torch.bfloat16), ours.cast(torch.bfloat16)
    vocab = hf_model.config.vocab_size
    tokenizer = ByteTokenizer(vocab)
    active = active_bytes_per_token(ours)
    weight_dtype = ours.lm_head.weight.dtype
    flops = matmul_flops(weight_dtype)
    compute_bound = flops / (2 * active / weight_dtype.itemsize)  # tokens/s if a token cost only its multiply-adds
    n_params = sum(p.numel() for p in ours.parameters())
    rows, bandwidths, torch_bandwidths, roof_ratios, torch_roof_ratios = [], [], [], [], []
    for concurrency in levels:
        samples = {"bf16": [], "fp8": [], "hf": [], "ceiling": []}
        for _ in range(trials):
            if concurrency == 1:
                speeds = weight_read_bandwidths()
                bandwidths.append(max(speeds.values()))
                torch_bandwidths.append(speeds["torch"])
            samples["bf16"].append(ours_tokens_per_s(ours, tokenizer, concurrency, new_tokens, "bf16"))
            if concurrency == 1:
                roof_ratios.append(samples["bf16"][-1] / (bandwidths[-1] / active))
                torch_roof_ratios.append(samples["bf16"][-1] / (torch_bandwidths[-1] / active))
            samples["fp8"].append(ours_tokens_per_s(ours, tokenizer, concurrency, new_tokens, "fp8"))
            samples["hf"].append(transformers_tokens_per_s(hf_model, concurrency, new_tokens, vocab))
            samples["ceiling"].append(gemm_floor_tokens_per_s(ours, concurrency))
        medians = {key: statistics.median(values) for key, values in samples.items()}
        rows.append((concurrency, medians["bf16"], medians["fp8"], medians["hf"], medians["ceiling"]))
    bandwidth = statistics.median(bandwidths)
    roofline = bandwidth / active
    bound = {c: c * bandwidth / step_weight_bytes(ours, c) for c in levels}
    overhead = {c: statistics.median(step_overhead_seconds(tiny, c, new_tokens) for _ in range(trials)) for c in levels}

    print(f"decode, DeepSeek-V3-shaped model: {n_params / 1e6:.1f}M parameters {args.weights}, {new_tokens} new "
          f"tokens per request, greedy; median of {trials} alternating trials per figure")
    print(machine_line())
    print(f"weight-read bandwidth (fp32 matvec, 256 MiB, fastest of torch's two orders and our C kernels; median "
          f"of the batch-1 trials): "
          f"{bandwidth / 1e9:.2f} GB/s "
          f"(range {min(bandwidths) / 1e9:.2f}-{max(bandwidths) / 1e9:.2f}); active weight bytes per token: "
          f"{active / 1e6:.1f} MB; roofline at batch 1: {roofline:.1f} tok/s")
    print(f"{args.weights} GEMM (256 x 4096 @ 4096 x 4096, fastest kernel): {flops / 1e9:.1f} GFLOP/s; compute bound "
          f"on decode at any batch: {compute_bound:.0f} tok/s")
    print("GEMM ceiling: tokens/s if a step cost only its weight GEMMs (our kernels; gemm_floor_tokens_per_s)")
    print("memory bound: tokens/s if a step only read, at the measured bandwidth, the weight bytes it needs "
          "(step_weight_bytes: experts used by uniform routing)")
    print("ours: tok/s with a bf16 and with an FP8 latent cache; ratios use the bf16-cache figure unless named")
    print(f"{'concurrent':>10}{'ours bf16-cache':>17}{'ours fp8-cache':>16}{'transformers tok/s':>20}"
          f"{'ours/hf':>9}{'fp8/hf':>8}{'ours/roofline':>15}{'GEMM ceiling':>14}{'ceiling/hf':>12}"
          f"{'ours/ceiling':>14}{'memory bound':>14}{'bound/hf':>10}")
    for concurrency, bf16, fp8, theirs, floor in rows:
        roof = f"{statistics.median(roof_ratios):>15.2f}" if concurrency == 1 else f"{'':>15}"
        print(f"{concurrency:>10}{bf16:>17.1f}{fp8:>16.1f}{theirs:>20.1f}{bf16 / theirs:>9.2f}"
              f"{fp8 / theirs:>8.2f}{roof}{floor:>14.1f}{floor / theirs:>12.2f}{bf16 / floor:>14.2f}"
              f"{bound[concurrency]:>14.1f}{bound[concurrency] / theirs:>10.2f}")
    print("step overhead: ms per decode step of our engine on a hidden-64, vocab-1000 copy of the architecture "
          "(no real GEMM work), against ms per step here:")
    for concurrency, bf16, _, _, floor in rows:
        ms = {"overhead": overhead[concurrency], "ours": concurrency / bf16, "GEMM ceiling": concurrency / floor}
        line = f"  at {concurrency}: " + "; ".join(f"{name} {value * 1e3:.1f} ms" for name, value in ms.items())
        print(line + (f"; roofline {1e3 / roofline:.1f} ms" if concurrency == 1 else ""))
    print(f"ours/roofline per batch-1 trial (bandwidth measured right before each): "
          f"{', '.join(f'{r:.2f}' for r in roof_ratios)}")
    torch_bandwidth = statistics.median(torch_bandwidths)
    print(f"against torch's matvec alone ({torch_bandwidth / 1e9:.2f} GB/s, range {min(torch_bandwidths) / 1e9:.2f}-"
          f"{max(torch_bandwidths) / 1e9:.2f}; the probe before our C kernel): ours/roofline "
          f"{statistics.median(torch_roof_ratios):.2f}, per trial {', '.join(f'{r:.2f}' for r in torch_roof_ratios)}")
    for concurrency, _, _, theirs, floor in rows:
        if concurrency > 1:
            print(f"at {concurrency} concurrent: 3x transformers = {3 * theirs:.0f} tok/s; GEMM ceiling {floor:.0f}; "
                  f"memory bound {bound[concurrency]:.0f}; compute bound {compute_bound:.0f}")
    from collections import Counter

    from model_worker.execution.panel_packs import panel_bytes
    from model_worker.execution.prepare import layer_methods

    print(f"layer methods chosen at load (execution.policy): {dict(Counter(layer_methods(ours).values()))}")

    print(f"peak RSS: {peak_rss_mib():.0f} MiB (whole process: both models, caches); of it, panel-packed weight "
          f"copies (execution.panel_packs) {panel_bytes() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
