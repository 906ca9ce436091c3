"""DeepSeek-V4 decode: our engine (`engine/v4_runner.py`, lossless state and MODEL1 FP8 pages) against
transformers' `DeepseekV4ForCausalLM.generate` on the same random weights, in one run.

A small V4 (all three attention layer types, hash-routed and learned MoE layers, mHC with 4 streams, fp32)
decodes N new tokens greedily for each of C concurrent requests with random prompts of P tokens (EOS
ignored); reported: generated tokens/s of each, the ratios, and whether ours and theirs produced the same
tokens (lossless state; the FP8 cache may differ where margins are thin). Median of alternating trials
(this machine's speed drifts).

    python benchmarks/v4_decode.py [--quick]
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
from common import machine_line  # noqa: E402

CONFIG = dict(
    vocab_size=4096, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=1, head_dim=128, q_lora_rank=128, partial_rotary_factor=0.25, num_experts_per_tok=2,
    n_routed_experts=16, n_shared_experts=1, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
    max_position_embeddings=4096, layer_types=["sliding_attention", "compressed_sparse_attention",
                                               "heavily_compressed_attention"] * 2,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe", "moe"], hc_mult=4, sliding_window=64,
    o_groups=4, o_lora_rank=64, index_n_heads=8, index_head_dim=64, index_topk=32, tie_word_embeddings=False,
)


def _checkpoint(path: Path):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**CONFIG)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("tid2eid"):
                buffer.copy_(torch.randint(0, CONFIG["n_routed_experts"], buffer.shape, generator=g))
    model.save_pretrained(path)
    return model


def _ours(model, prompts: list[list[int]], new: int, fp8: bool) -> tuple[float, list[list[int]]]:
    from model_worker.engine.engine import EngineConfig, LLMEngine
    from model_worker.engine.sampling import SamplingParams

    engine = LLMEngine(model, None, EngineConfig(kv_cache_dtype="fp8" if fp8 else "auto", max_num_seqs=64,
                                                 enable_prefix_caching=False))
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for out in engine.step():  # the prefill and the first token: not decode time
        tokens[out.request_id] += out.new_token_ids
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    seconds = time.perf_counter() - start
    return len(prompts) * (new - 1) / seconds, [tokens[f"r{i}"] for i in range(len(prompts))]


def _theirs(model, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)  # prefill + first token, subtracted below
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
        seconds = time.perf_counter() - start - first
    return len(prompts) * (new - 1) / seconds, [row[ids.shape[1]:].tolist() for row in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    trials, new, prompt_len = (2, 12, 96) if args.quick else (3, 32, 200)
    from model_worker.v4 import load_v4_model

    with tempfile.TemporaryDirectory() as tmp:
        theirs_model = _checkpoint(Path(tmp))
        ours_model = load_v4_model(tmp)
    print(f"DeepSeek-V4 decode, random {sum(p.numel() for p in ours_model.parameters()) / 1e6:.1f}M-parameter fp32 "
          f"model (sliding/CSA/HCA layers, window {CONFIG['sliding_window']}); prompts of {prompt_len} tokens, "
          f"{new} new tokens each, greedy; median of {trials} alternating trials")
    print(machine_line())
    print(f"{'concurrent':>10}{'ours tok/s':>12}{'ours fp8':>10}{'transformers':>14}{'ours/hf':>9}{'fp8/hf':>8}"
          f"  same tokens (lossless)")
    for concurrency in (1, 8):
        g = torch.Generator().manual_seed(concurrency)
        prompts = torch.randint(0, CONFIG["vocab_size"], (concurrency, prompt_len), generator=g).tolist()
        samples: dict[str, list[float]] = {"ours": [], "fp8": [], "hf": []}
        for _ in range(trials):
            rate, ours_tokens = _ours(ours_model, prompts, new, fp8=False)
            samples["ours"].append(rate)
            samples["fp8"].append(_ours(ours_model, prompts, new, fp8=True)[0])
            rate, hf_tokens = _theirs(theirs_model, prompts, new)
            samples["hf"].append(rate)
        ours, fp8, hf = (statistics.median(samples[k]) for k in ("ours", "fp8", "hf"))
        print(f"{concurrency:>10}{ours:>12.1f}{fp8:>10.1f}{hf:>14.1f}{ours / hf:>9.2f}{fp8 / hf:>8.2f}  "
              f"{ours_tokens == hf_tokens}")


if __name__ == "__main__":
    main()
