"""Public entry points: `load_model`, `save_model`, `build_random_model`.

A checkpoint directory holds `config.json`, the weights (`model.safetensors` or shards with an index)
and, for Engram models, `engram_tables.safetensors` (kept apart so the memory service can map the
tables without the dense weights). Loading validates everything before it builds anything it returns.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_worker.config import ModelConfig
from model_worker.engram_tables import EngramTable, InProcessEngramTables
from model_worker.errors import CheckpointError
from model_worker.model import CausalLM
from model_worker.weights import load_state, read_checkpoint, save_state

ENGRAM_TABLES_FILE = "engram_tables.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP8_MODES = ("dequantize", "gemm")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: {dtype} not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(path: str | Path, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               fp8_mode: str = "dequantize", strict_config: bool = True, pack_weights: bool = True,
               engram_tables: bool = True) -> CausalLM:
    """Load a checkpoint directory (ours, or HF DeepSeek-V2/V3) into an eval-mode CausalLM.

    fp8_mode: for FP8 checkpoints (`weight_scale_inv` present), "dequantize" converts the weights to
    `dtype` at load time; "gemm" keeps them in FP8 and runs the block-scaled FP8 GEMM.
    pack_weights: give each layer this host's method and the weight copy its kernel reads (panel-packed fp32
    weights for our C panel kernel, `CausalLM.arrange_weights`); False runs torch's kernels and saves that
    second copy of each fp32 weight's memory.
    engram_tables: False leaves `engram_tables.safetensors` unread (it need not exist): the model's Engram
    rows come from elsewhere (`attach_engram_tables` with a memory-service client) before it runs.
    """
    if fp8_mode not in FP8_MODES:
        raise ValueError(f"fp8_mode: {fp8_mode!r} not in {FP8_MODES}")
    torch_dtype = resolve_dtype(dtype)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config = ModelConfig.from_pretrained(path, strict=strict_config)
    tensors = read_checkpoint(path)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # the shared tensor is loaded once, as the embedding
    model = CausalLM(config)
    load_state(model, tensors, fp8_mode=fp8_mode, dtype=torch_dtype, ignore=_ignorable(config),
               activation_scale_fmt=config.fp8_scale_fmt)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.cast(torch_dtype, arrange=False)  # arranged once, on the target device, below
    if config.uses_engram and engram_tables:
        model.attach_engram_tables(load_engram_tables(path, config))
    return model.to(device).eval().arrange_weights(pack=pack_weights)


def _ignorable(config: ModelConfig):
    """Checkpoint tensors we knowingly skip: MTP layers past num_hidden_layers, rotary caches, and
    the lm_head of tied models."""

    def ignore(name: str) -> bool:
        match = _LAYER_NAME.match(name)
        if match and int(match.group(1)) >= config.num_hidden_layers:
            return True
        if name.endswith("rotary_emb.inv_freq"):
            return True
        return config.tie_word_embeddings and name == "lm_head.weight"

    return ignore


def load_engram_tables(path: str | Path, config: ModelConfig) -> InProcessEngramTables:
    """Read `engram_tables.safetensors`, checking one table per Engram layer with the rows the hash needs."""
    file = Path(path) / ENGRAM_TABLES_FILE
    if not file.is_file():
        raise CheckpointError(f"Engram model without tables: {file} is missing")
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers / truncation
        raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc
    tables = InProcessEngramTables.from_tensors(tensors)
    _check_tables(tables, config, file)
    return tables


def _check_tables(tables: InProcessEngramTables, config: ModelConfig, file: Path) -> None:
    from model_worker.engram_hashing import EngramHasher

    hasher = EngramHasher(config.engram_layer_ids, config.engram_max_ngram_size, config.engram_n_heads,
                          config.engram_vocab_size, config.engram_num_embeddings, 0)
    problems = []
    for layer_id in config.engram_layer_ids:
        table = tables.tables.get(layer_id)
        if table is None:
            problems.append(f"engram.{layer_id}.table: missing")
            continue
        rows, dim = table.data.shape
        if rows != hasher.table_rows(layer_id) or dim != config.engram_head_dim:
            problems.append(f"engram.{layer_id}.table: shape [{rows}, {dim}], expected "
                            f"[{hasher.table_rows(layer_id)}, {config.engram_head_dim}]")
    extra = sorted(set(tables.tables) - set(config.engram_layer_ids))
    problems += [f"engram.{layer}.table: no such Engram layer in config" for layer in extra]
    if problems:
        raise CheckpointError(f"{file}: Engram tables do not fit the config", problems)


def save_model(model: CausalLM, path: str | Path) -> None:
    """Write config.json, model.safetensors and (Engram models) engram_tables.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path)
    save_state(model, path)
    if model.config.uses_engram:
        tables = model.engram_tables
        if not isinstance(tables, InProcessEngramTables):
            raise TypeError("save_model needs in-process Engram tables to write them")
        items = {name: t.contiguous() for name, t in tables.state_dict_items()}
        save_file(items, str(path / ENGRAM_TABLES_FILE))


def build_random_model(config: ModelConfig, *, seed: int = 0, token_map: torch.Tensor | None = None,
                       std: float = 0.02) -> CausalLM:
    """A randomly initialised model (tests, benchmarks, the demo). token_map: raw -> compressed ids
    (identity when omitted); Engram tables are random in the config's table dtype."""
    torch.manual_seed(seed)
    model = CausalLM(config)
    init_weights(model, torch.Generator().manual_seed(seed), std)
    if config.uses_engram:
        if token_map is None:
            token_map = torch.arange(config.vocab_size) % config.engram_num_embeddings
        model.model.engram_token_map.copy_(token_map)
        model.attach_engram_tables(random_engram_tables(config, seed))
    return model.eval().arrange_weights()


def init_weights(model: CausalLM, generator: torch.Generator, std: float) -> None:
    """Norm weights 1, mHC and Engram gate parameters as their modules initialise them, the rest N(0, std^2)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            elif "_hc." in name or ".hc_head." in name or name.endswith(("q_weight", "k_weight")):
                continue  # mHC and Engram gate parameters keep their modules' own initialisation
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def random_engram_tables(config: ModelConfig, seed: int = 0) -> InProcessEngramTables:
    """Random tables, one per Engram layer, sized by the hash layout."""
    from model_worker.engram_hashing import EngramHasher

    hasher = EngramHasher(config.engram_layer_ids, config.engram_max_ngram_size, config.engram_n_heads,
                          config.engram_vocab_size, config.engram_num_embeddings, 0)
    return InProcessEngramTables({
        layer: EngramTable.random(hasher.table_rows(layer), config.engram_head_dim,
                                  dtype=config.engram_table_dtype, seed=seed + layer)
        for layer in config.engram_layer_ids})
