"""Shared pieces of the benchmark scripts: the DeepSeek-V3-shaped test model, timing, machine facts."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

# A DeepSeek-V3-shaped model of about 100M parameters: MLA with q/kv LoRA, MoE with grouped routing and a
# shared expert, first layer dense.
V3_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, moe_intermediate_size=384,
               num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384,
               kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
               n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
               max_position_embeddings=4096, rope_interleave=True, tie_word_embeddings=False)


def save_hf_v3(path: Path, seed: int = 0, **overrides):
    """Random transformers DeepseekV3ForCausalLM saved with save_pretrained; returns the HF model."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**V3_100M, **overrides})).eval()
    model.save_pretrained(path)
    return model


class ByteTokenizer:
    """Minimal tokenizer for the engine's detokenizer, for benchmarks that only count tokens."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eos_token_id = vocab_size, None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x4E00 + (int(i) % 20000)) for i in ids)


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_line() -> str:
    return (f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
