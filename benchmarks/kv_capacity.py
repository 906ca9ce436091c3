"""KV-cache capacity: tokens that fit in a fixed memory budget, from real allocations.

For DeepSeek-V3 dimensions (61 layers, kv_lora_rank 512, rope 64, 128 heads of 128+64 / 128) and for
the ~100M benchmark model, it allocates the engine's paged latent cache in the FP8 (FlashMLA V3.2
layout) and bf16 formats under the same byte budget, and a per-head K/V cache (what attention without
MLA's latent compression stores: every head's full key and value, bf16), then counts tokens and
reads bytes per token per layer from the allocated tensors.

Then DeepSeek-V3's MLA against DeepSeek-V4 at 8k and 128k tokens per sequence, side by side: the tokens of
context that fit a fixed FP8 cache budget (V3: 656 B per token per layer; V4: 584 B per entry in FlashMLA's
MODEL1 layout, a sliding window plus compressed entries; arithmetic on the layouts, `v4_cache_model.py`).

    python benchmarks/kv_capacity.py [--quick] [--context-budget-gib 64] [--v3-config PATH] [--v4-config PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import V3_100M, machine_line  # noqa: E402
from v4_cache_model import print_context_table  # noqa: E402

V3_FULL = dict(num_hidden_layers=61, kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=128,
               qk_nope_head_dim=128, v_head_dim=128)


def latent_capacity(dims: dict, fmt: str, budget: int, block_size: int = 64) -> tuple[int, float]:
    """(tokens that fit, measured bytes per token per layer) for the paged latent cache."""
    from model_worker.engine.block_manager import BlockManager
    from model_worker.engine.kv_cache import PagedLatentCache

    layers = dims["num_hidden_layers"]
    per_token = PagedLatentCache.bytes_per_token(dims["kv_lora_rank"], dims["qk_rope_head_dim"], fmt) * layers
    blocks = BlockManager.blocks_for_budget(budget, per_token, block_size)
    cache = PagedLatentCache(layers, blocks, dims["kv_lora_rank"], dims["qk_rope_head_dim"], fmt=fmt,
                             block_size=block_size)
    allocated = sum(cache.layer_storage(i).nbytes for i in range(layers))
    tokens = blocks * block_size
    return tokens, allocated / tokens / layers


def per_head_capacity(dims: dict, budget: int) -> tuple[int, float]:
    """Same budget as expanded per-head keys (nope + rope) and values in bf16, counted per token (a
    64-token page of V3's per-head cache is 320 MB, so pages would round small budgets down to zero)."""
    layers, heads = dims["num_hidden_layers"], dims["num_attention_heads"]
    width = heads * (dims["qk_nope_head_dim"] + dims["qk_rope_head_dim"] + dims["v_head_dim"])
    tokens = budget // (layers * width * 2)
    storage = [torch.empty(tokens, width, dtype=torch.bfloat16) for _ in range(layers)]
    return tokens, sum(t.nbytes for t in storage) / max(tokens, 1) / layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget-mib", type=int, default=None)
    parser.add_argument("--context-budget-gib", type=float, default=64.0, help="budget of the V3/V4 table")
    parser.add_argument("--v3-config", type=Path, help="a V3 checkpoint's config.json (default: transformers')")
    parser.add_argument("--v4-config", type=Path, help="a V4 checkpoint's config.json (default: transformers')")
    args = parser.parse_args()
    budget = (args.budget_mib or (256 if args.quick else 1024)) * 2**20
    print(f"KV capacity in a {budget / 2**20:.0f} MiB budget (latent caches in pages of 64 tokens)")
    print(machine_line())
    print(f"{'model':<14}{'cache':<22}{'bytes/token/layer':>18}{'tokens':>10}{'vs per-head':>13}")
    for name, dims in (("DeepSeek-V3", V3_FULL), ("bench ~100M", V3_100M)):
        head_tokens, head_bytes = per_head_capacity(dims, budget)
        rows = [("per-head K/V bf16", head_tokens, head_bytes)]
        for fmt in ("bf16", "fp8"):
            tokens, per_layer = latent_capacity(dims, fmt, budget)
            rows.append((f"latent {fmt}", tokens, per_layer))
        for label, tokens, per_layer in rows:
            ratio = tokens / head_tokens if head_tokens else float("inf")
            print(f"{name:<14}{label:<22}{per_layer:>18.0f}{tokens:>10}{ratio:>12.1f}x")
    print_context_table(args.context_budget_gib, args.v3_config, args.v4_config)


if __name__ == "__main__":
    main()
