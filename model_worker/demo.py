"""The main job on embedded defaults (until the agent runtime lands): build, save, reload, generate.

`python -m model_worker.demo` (or `make demo`) builds the demo tokenizer and a small model of our
architecture (MLA + mHC + MoE + Engram with FP8 tables), writes it as a checkpoint under the data dir,
loads it back through the public `load_model` / `load_tokenizer` path, checks the reload reproduces
the logits exactly, and generates greedily from a chat prompt. The weights are random, so the text is
gibberish: this shows the machinery, not a trained model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from model_worker.config import ModelConfig
from model_worker.demo_tokenizer import build_demo_tokenizer
from model_worker.generate import greedy_generate
from model_worker.loading import build_random_model, load_model, save_model
from model_worker.tokenizer import load_tokenizer


def demo_config(vocab_size: int, compressed_vocab_size: int, pad_token_id: int) -> ModelConfig:
    """A ~10M-parameter model of our architecture that runs in seconds on a CPU."""
    return ModelConfig.from_dict(dict(
        model_type="engram_mhc", vocab_size=vocab_size, hidden_size=256, intermediate_size=768,
        moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128,
        kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
        max_position_embeddings=4096, hc_mult=4, engram_layer_ids=[1, 3], engram_max_ngram_size=3,
        engram_n_heads=4, engram_head_dim=64, engram_vocab_size=4093,
        engram_num_embeddings=compressed_vocab_size, engram_pad_token_id=pad_token_id,
        engram_table_dtype="fp8", bos_token_id=0, eos_token_id=1, pad_token_id=pad_token_id))


def default_data_dir() -> Path:
    return Path(os.environ.get("ENGRAM_DATA_DIR", Path.cwd() / ".engram"))


def build_demo_checkpoint(out_dir: Path, seed: int = 0):
    """Write tokenizer + config + weights + Engram tables of the demo model to out_dir; returns the model."""
    tokenizer = build_demo_tokenizer(out_dir)
    token_map = torch.tensor(tokenizer.compressed_token_map(), dtype=torch.int64)
    config = demo_config(tokenizer.vocab_size, tokenizer.compressed_vocab_size, tokenizer.pad_token_id)
    model = build_random_model(config, seed=seed, token_map=token_map, std=0.05)
    save_model(model, out_dir)
    return model


def _reproduces(loaded, built, probe: torch.Tensor) -> bool:
    """Every tensor bit-identical, and the logits equal up to float rounding: the GEMM library may round
    differently for weights at other memory addresses (a reloaded checkpoint), not for other values."""
    saved, reloaded = built.state_dict(), loaded.state_dict()
    if saved.keys() != reloaded.keys() or not all(torch.equal(saved[k], reloaded[k]) for k in saved):
        return False
    return torch.allclose(loaded(probe), built(probe), rtol=1e-5, atol=1e-5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="where the demo checkpoint is written")
    parser.add_argument("--prompt", default="What is 17 plus 25?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    path = (args.data_dir or default_data_dir()) / "demo-model"
    started = time.perf_counter()
    built_model = build_demo_checkpoint(path)
    built = time.perf_counter()
    model = load_model(path, dtype=args.dtype)
    tokenizer = load_tokenizer(path)
    loaded = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    table_rows = sum(t.rows for t in model.engram_tables.tables.values())
    print(f"checkpoint: {path}")
    print(f"model: {model.config.model_type}, {n_params / 1e6:.1f}M parameters, {model.config.num_hidden_layers} "
          f"layers, hc_mult={model.config.hc_mult}, Engram layers {model.config.engram_layer_ids} "
          f"({table_rows} FP8 table rows)")
    print(f"tokenizer: {tokenizer.vocab_size} ids -> {tokenizer.compressed_vocab_size} compressed Engram ids")

    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    probe = torch.tensor([prompt_ids])
    if args.dtype == "float32" and not _reproduces(model, built_model, probe):
        print("error: the reloaded checkpoint does not reproduce the saved model", file=sys.stderr)
        return 1
    start = time.perf_counter()
    new_ids = greedy_generate(model, prompt_ids, args.max_new_tokens, {tokenizer.eos_token_id})
    elapsed = time.perf_counter() - start
    print(f"prompt ({len(prompt_ids)} tokens): {args.prompt!r}")
    print(f"generated ({len(new_ids)} tokens, random weights): {tokenizer.decode(new_ids)!r}")
    print(f"build {built - started:.2f}s, load {loaded - built:.2f}s, generate {len(new_ids) / elapsed:.1f} tok/s "
          f"(full recompute; the paged engine is issue #3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
