"""Prefill throughput: our model vs transformers' DeepseekV3ForCausalLM on the same weights and inputs.

Builds a DeepSeek-V3-shaped config of about 100M parameters (MLA with q/kv LoRA, MoE with grouped
routing and a shared expert, first layer dense), saves random weights with transformers'
`save_pretrained`, loads them through our `load_model`, and times a batched forward pass of both in
fp32 and bf16 on the same inputs. Prints tokens/s, the ratio, and the logit difference (a sanity
check that both computed the same thing).

    python benchmarks/prefill.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

V3_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, moe_intermediate_size=384,
               num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384,
               kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
               n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
               max_position_embeddings=4096, rope_interleave=True, tie_word_embeddings=False)


def _time(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _rel_rms(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits.float() - reference).norm() / reference.norm()).item()


def _compare(ours, theirs, ids: torch.Tensor, repeats: int, reference: torch.Tensor) -> tuple[float, ...]:
    """(our tokens/s, transformers tokens/s, our error, their error); errors are relative RMS logit
    differences from the fp32 transformers run, so bf16 rounding shows up on both sides alike."""
    with torch.inference_mode():
        t_ours = _time(lambda: ours(ids), repeats)
        t_theirs = _time(lambda: theirs(ids, use_cache=False).logits, repeats)
        ours_err = _rel_rms(ours(ids), reference)
        theirs_err = _rel_rms(theirs(ids, use_cache=False).logits, reference)
    return ids.numel() / t_ours, ids.numel() / t_theirs, ours_err, theirs_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    args = parser.parse_args()
    batch = args.batch or (2 if args.quick else 4)
    seq = args.seq or (128 if args.quick else 512)
    repeats = 2 if args.quick else 5

    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from model_worker import load_model

    torch.manual_seed(0)
    hf_config = DeepseekV3Config(**V3_100M)
    hf_model = DeepseekV3ForCausalLM(hf_config).eval()
    n_params = sum(p.numel() for p in hf_model.parameters())
    ids = torch.randint(0, hf_config.vocab_size, (batch, seq))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(Path(tmp))
        with torch.inference_mode():
            reference = hf_model(ids, use_cache=False).logits.float()
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ours = load_model(tmp, dtype=dtype)
            rows.append((dtype_name, *_compare(ours, hf_model.to(dtype), ids, repeats, reference)))

    print(f"prefill, DeepSeek-V3-shaped model: {n_params / 1e6:.1f}M parameters, batch {batch} x {seq} tokens")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("error = relative RMS logit difference from transformers in fp32")
    print(f"{'dtype':<6}{'ours tok/s':>12}{'transformers tok/s':>20}{'ratio':>8}{'ours error':>12}{'their error':>13}")
    for name, ours_tps, theirs_tps, ours_err, theirs_err in rows:
        print(f"{name:<6}{ours_tps:>12.1f}{theirs_tps:>20.1f}{ours_tps / theirs_tps:>8.2f}"
              f"{ours_err:>12.2e}{theirs_err:>13.2e}")


if __name__ == "__main__":
    main()
