"""A small random model of our architecture (MLA + mHC + MoE + Engram) and its tokenizer, for engine tests."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from model_worker import ModelConfig, build_random_model
from model_worker.demo_tokenizer import build_demo_tokenizer
from model_worker.engine.engine import EngineConfig, LLMEngine
from model_worker.engine.sampling import SamplingParams


@functools.cache
def demo_tokenizer():
    return build_demo_tokenizer(Path(tempfile.mkdtemp(prefix="engram-tok-")))


def tiny_config(**patch) -> ModelConfig:
    tok = demo_tokenizer()
    fields = dict(model_type="engram_mhc", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96,
                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
                  kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
                  max_position_embeddings=2048, hc_mult=2, engram_layer_ids=[1], engram_max_ngram_size=3,
                  engram_n_heads=2, engram_head_dim=32, engram_vocab_size=257,
                  engram_num_embeddings=tok.compressed_vocab_size, engram_pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    fields.update(patch)
    return ModelConfig.from_dict(fields)


def tiny_model(seed: int = 0, **patch):
    config = tiny_config(**patch)
    token_map = torch.tensor(demo_tokenizer().compressed_token_map(), dtype=torch.int64)
    return build_random_model(config, seed=seed, token_map=token_map, std=0.2)


def make_engine(model=None, **config) -> LLMEngine:
    return LLMEngine(model if model is not None else tiny_model(), demo_tokenizer(), EngineConfig(**config))


def random_prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, demo_tokenizer().vocab_size, (length,), generator=gen).tolist()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run_to_completion(engine: LLMEngine, max_steps: int = 100_000) -> dict[str, list]:
    """Step until idle; returns {request_id: [RequestOutput, ...]}."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def tokens_of(outputs: list) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def tiny_checkpoint(model_dir: Path, *, seed: int = 2, **patch) -> Path:
    """A tiny random checkpoint saved with the demo tokenizer at `model_dir`: what the runtime's server tests
    load as a real ModelWorker."""
    from model_worker import save_model

    save_model(tiny_model(seed=seed, max_position_embeddings=4096, **patch), model_dir)
    build_demo_tokenizer(model_dir)
    return model_dir
