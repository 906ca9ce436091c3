"""The arithmetic behind benchmarks/kv_capacity.py's context table: bytes per sequence of DeepSeek-V3-style MLA
against DeepSeek-V4, both with FP8 caches, and the tokens of context that fit a budget.

Per sequence of L tokens, per layer, in pages of `block_size` tokens (a partly filled page costs a page):

- V3 (MLA): L latent rows of 656 B (FlashMLA's V3.2 FP8 layout, `engram_kernels.mla_decode.layout`: 512 e4m3 + 4 fp32
  tile scales + 64 bf16 rope), on every layer.
- V4 (`engram_kernels.mla_decode.model1_layout`, FlashMLA's MODEL1 layout: 584 B per token, pages padded to a
  multiple of 576 B) on every layer: the sliding window's last min(L, window) tokens (older pages are
  recycled), plus on compressed layers one entry per `rate` tokens (CSA rate 4, HCA rate 128); CSA layers
  also keep the lightning indexer's compressed keys (index_head_dim values per entry, assumed stored as
  V3.2's indexer cache is: e4m3 plus one fp32 scale, 132 B for 128 values) and every compressed layer the
  compressor's open window (up to rate - 1 tokens of the compressor's kv and gate inputs, 2 x head_dim
  values each (CSA: 2 x 2 x head_dim, its overlapping windows), assumed bf16).

Layer counts and sizes come from transformers' config defaults (DeepseekV3Config; DeepseekV4Config, which
documents DeepSeek-V4-Flash-Base: 43 layers, window 128, 2 HCA layers then CSA/HCA alternating), or from a
checkpoint's config.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engram_kernels.mla_decode.layout import LatentCacheLayout  # noqa: E402
from engram_kernels.mla_decode.model1_layout import Model1CacheLayout  # noqa: E402

BLOCK_SIZE = 64
CONTEXTS = (8 * 1024, 128 * 1024)
INDEXER_SCALE_BYTES = 4  # one fp32 scale per indexer key (V3.2's indexer cache format; an assumption for V4)
BF16 = 2


def pages(entries: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-entries // block_size)


@dataclass(frozen=True)
class V3Cache:
    layers: int
    kv_lora_rank: int
    rope_dim: int

    @classmethod
    def from_config(cls, config: dict) -> V3Cache:
        return cls(config["num_hidden_layers"], config["kv_lora_rank"], config["qk_rope_head_dim"])

    @property
    def row_bytes(self) -> int:
        return LatentCacheLayout(self.kv_lora_rank, self.rope_dim, "fp8").bytes_per_token

    def bytes_per_sequence(self, length: int) -> dict[str, int]:
        return {"latent rows": self.layers * pages(length) * BLOCK_SIZE * self.row_bytes}


@dataclass(frozen=True)
class V4Cache:
    layer_types: tuple[str, ...]
    head_dim: int
    rope_dim: int
    window: int
    rates: dict[str, int]
    index_head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> V4Cache:
        rope = int(config["head_dim"] * config["partial_rotary_factor"])
        return cls(tuple(config["layer_types"]), config["head_dim"], rope, config["sliding_window"],
                   dict(config["compress_rates"]), config["index_head_dim"])

    @property
    def layout(self) -> Model1CacheLayout:
        return Model1CacheLayout(nope_dim=self.head_dim - self.rope_dim, rope_dim=self.rope_dim, block_size=BLOCK_SIZE)

    def bytes_per_sequence(self, length: int) -> dict[str, int]:
        page = self.layout.page_bytes
        out = {"sliding window": 0, "compressed entries": 0, "indexer keys": 0, "open windows": 0}
        for kind in self.layer_types:
            out["sliding window"] += pages(min(length, self.window) + BLOCK_SIZE - 1) * page  # window spans pages
            if kind == "sliding_attention":
                continue
            rate = self.rates[kind]
            entries = length // rate
            out["compressed entries"] += pages(entries) * page
            overlap = 2 if kind == "compressed_sparse_attention" else 1
            out["open windows"] += (rate - 1) * 2 * overlap * self.head_dim * BF16
            if kind == "compressed_sparse_attention":
                out["indexer keys"] += pages(entries) * BLOCK_SIZE * (self.index_head_dim + INDEXER_SCALE_BYTES)
        return out


def capacity_rows(v3: V3Cache, v4: V4Cache, budget: int) -> list[dict]:
    rows = []
    for length in CONTEXTS:
        for name, cache in (("V3 MLA (656 B FP8)", v3), ("V4 (584 B FP8 + compressed)", v4)):
            parts = cache.bytes_per_sequence(length)
            per_seq = sum(parts.values())
            sequences = budget // per_seq
            rows.append({"context": length, "model": name, "per_seq": per_seq, "parts": parts,
                         "sequences": sequences, "tokens": sequences * length})
    return rows


def v4_config(path: Path | None) -> dict:
    """A V4 config as a dict with its derived fields (layer_types, compress_rates, partial_rotary_factor):
    transformers' defaults, or a checkpoint's config.json read through DeepseekV4Config."""
    from transformers import DeepseekV4Config

    loaded = DeepseekV4Config(**json.loads(path.read_text())) if path else DeepseekV4Config()
    return {**loaded.to_dict(), "partial_rotary_factor": loaded.partial_rotary_factor,
            "layer_types": loaded.layer_types, "compress_rates": loaded.compress_rates}


def print_context_table(budget_gib: float, v3_path: Path | None, v4_path: Path | None) -> None:
    """V3 against V4 at CONTEXTS tokens per sequence, side by side, in a budget_gib cache."""
    from transformers import DeepseekV3Config

    v3 = V3Cache.from_config(json.loads(v3_path.read_text()) if v3_path else DeepseekV3Config().to_dict())
    v4 = V4Cache.from_config(v4_config(v4_path))
    budget = int(budget_gib * 2**30)
    kinds = {k: v4.layer_types.count(k) for k in dict.fromkeys(v4.layer_types)}
    print(f"\nContext that fits a {budget_gib:g} GiB budget, FP8 caches, pages of {BLOCK_SIZE} tokens")
    print(f"V3: {v3.layers} layers x {v3.row_bytes} B per token; V4: {len(v4.layer_types)} layers {kinds}, "
          f"{v4.layout.bytes_per_token} B per entry ({v4.layout.page_bytes} B per page of {BLOCK_SIZE}), window "
          f"{v4.window}, rates {v4.rates}, indexer keys {v4.index_head_dim} + {INDEXER_SCALE_BYTES} B")
    header = ("context", "model", "MiB per sequence", "of which", "sequences", "tokens in budget", "V4/V3")
    rows = capacity_rows(v3, v4, budget)
    table = []
    for i, row in enumerate(rows):
        parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in row["parts"].items() if v)
        ratio = f"{row['tokens'] / rows[i - 1]['tokens']:.1f}x" if i % 2 and rows[i - 1]["tokens"] else ""
        table.append((f"{row['context'] // 1024}k", row["model"], f"{row['per_seq'] / 2**20:.1f}", parts,
                      f"{row['sequences']:,}", f"{row['tokens']:,}", ratio))
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(c.ljust(w) if i in (1, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("V4/V3: tokens that fit, V4 over V3. Assumed, not taken from a kernel: indexer keys as e4m3 + one fp32 "
          "scale; the compressor's open windows as bf16 (kv and gate).")
