"""The demo model's architecture, trainable Engram tables, and the export to a servable checkpoint.

Training runs our own `CausalLM` (so what is trained is what is served) with two changes: the weight
fusions are switched off (they copy weights outside autograd), and the Engram tables are fp32
parameters (`TrainableEngramTables`) instead of FP8 rows. `export_checkpoint` writes the tables in
FP8 with block scales, as every Engram checkpoint stores them, through the normal `save_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model_worker.config import ModelConfig
from model_worker.engram_hashing import EngramHasher
from model_worker.engram_tables import EngramTable, InProcessEngramTables
from model_worker.execution.fused import fusions_of
from model_worker.loading import init_weights, load_engram_tables, save_model
from model_worker.model import CausalLM
from model_worker.tokenizer import Tokenizer

INIT_STD = 0.02
EXPORT_DTYPE = torch.bfloat16
TABLE_INIT_STD = 0.5


def demo_model_config(tokenizer: Tokenizer, *, engram: bool = True, mhc: bool = True) -> ModelConfig:
    """About 6M dense parameters (6 layers of width 256, 8 MLA heads) plus two Engram tables of about 63k rows
    of 32 values, on layers 1 and 2. engram False gives the ablation baseline without Engram layers; mhc
    True the 4-stream mHC residual instead of the plain one."""
    return ModelConfig.from_dict(dict(
        model_type="engram_mhc", vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=768,
        num_hidden_layers=6, num_attention_heads=8, q_lora_rank=96, kv_lora_rank=96, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=0,
        first_k_dense_replace=6, n_group=1, topk_group=1, max_position_embeddings=4096,
        tie_word_embeddings=True, hc_mult=4 if mhc else 1, engram_layer_ids=[1, 2] if engram else [],
        engram_max_ngram_size=3, engram_n_heads=4, engram_head_dim=32, engram_vocab_size=7919,
        engram_num_embeddings=tokenizer.compressed_vocab_size, engram_pad_token_id=tokenizer.pad_token_id,
        engram_table_dtype="fp8", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


class TrainableEngramTables:
    """fp32 Engram tables as parameters, one [rows, head_dim] per Engram layer; an EngramTableClient. Not a
    module, so attaching it keeps the tables out of the model's state dict (they are saved apart)."""

    def __init__(self, config: ModelConfig, generator: torch.Generator):
        hasher = EngramHasher(config.engram_layer_ids, config.engram_max_ngram_size, config.engram_n_heads,
                              config.engram_vocab_size, config.engram_num_embeddings, 0)
        self.tables = {
            layer: nn.Parameter(torch.randn(hasher.table_rows(layer), config.engram_head_dim,
                                                 generator=generator) * TABLE_INIT_STD)
            for layer in config.engram_layer_ids}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.tables.values())

    def to(self, device: torch.device | str) -> TrainableEngramTables:
        """Move the tables in place (the same Parameter objects, so an optimizer built on them stays valid)."""
        for table in self.tables.values():
            table.data = table.data.to(device)
        return self

    def lookup(self, layer_id: int, hash_ids: torch.Tensor) -> torch.Tensor:
        """hash_ids int64 [...] -> rows [..., head_dim] (differentiable)."""
        return nn.functional.embedding(hash_ids, self.tables[layer_id])

    def to_fp8(self) -> InProcessEngramTables:
        return InProcessEngramTables({layer: EngramTable.from_float(table.detach(), "fp8")
                                      for layer, table in self.tables.items()})


def build_trainable(config: ModelConfig, tokenizer: Tokenizer,
                    seed: int) -> tuple[CausalLM, TrainableEngramTables | None]:
    """A freshly initialised model in training mode, fusions off, with trainable tables attached."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = CausalLM(config)
    for module in model.modules():
        for fusion in fusions_of(module).values():
            fusion.disable()
    init_weights(model, generator, INIT_STD)
    tables = None
    if config.uses_engram:
        model.model.engram_token_map.copy_(torch.tensor(tokenizer.compressed_token_map(), dtype=torch.int64))
        tables = TrainableEngramTables(config, generator)
        model.attach_engram_tables(tables)
    return model.train(), tables


def export_checkpoint(model: CausalLM, tables: TrainableEngramTables | None, tokenizer_dir: Path,
                      out_dir: Path) -> None:
    """Write a servable checkpoint: config, bf16 weights, FP8 Engram tables, and the tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trainable = model.engram_tables
    if tables is not None:
        model.engram_tables = tables.to_fp8()
    try:
        save_model(model, out_dir)
    finally:
        model.engram_tables = trainable
    weights = out_dir / "model.safetensors"  # fp32 while training; shipped in bf16 (half the size)
    save_file({name: t.to(EXPORT_DTYPE) if t.is_floating_point() else t for name, t in load_file(weights).items()},
              str(weights), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out_dir / name).write_bytes((tokenizer_dir / name).read_bytes())


def load_exported(model: CausalLM, tables: TrainableEngramTables | None, checkpoint: Path) -> None:
    """Start from an exported checkpoint (`export_checkpoint`'s output: bf16 weights, FP8 tables), to train
    it further: every parameter and the token map from model.safetensors (as fp32), the Engram tables
    dequantized. The checkpoint must come from the same architecture and tokenizer."""
    weights = load_file(str(checkpoint / "model.safetensors"))
    state = model.state_dict()
    missing, unexpected = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unexpected or any(weights[name].shape != state[name].shape for name in state):
        why = (f"missing {', '.join(missing[:3])}" if missing else
               f"unexpected {', '.join(unexpected[:3])}" if unexpected else "shapes differ")
        raise ValueError(f"{checkpoint}: not a checkpoint of this architecture ({why})")
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(weights[name].to(tensor.dtype))
        if tables is not None:
            exported = load_engram_tables(checkpoint, model.config).tables
            for layer, table in tables.tables.items():
                table.copy_(exported[layer].dequantize())
