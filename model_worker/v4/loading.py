"""Loading a DeepSeek-V4 checkpoint directory (config.json + safetensors, DeepSeek's or transformers' tensor
names, `names.model_name`) into a V4CausalLM, all or nothing: a missing, unexpected or misshapen tensor is a
CheckpointError naming it; multi-token-prediction weights (`mtp.*`) are skipped (not used for generation)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model_worker.errors import CheckpointError, ConfigError
from model_worker.v4.config import V4Config
from model_worker.v4.model import V4CausalLM
from model_worker.v4.names import model_name
from model_worker.weights import load_state, read_checkpoint


def read_v4_config(path: str | Path) -> V4Config:
    config_file = Path(path) / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in {path}") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{config_file}: not readable JSON ({error})") from None
    return V4Config.from_dict(raw)


def load_v4_model(path: str | Path, *, dtype: str | torch.dtype = torch.float32,
                  engram_tables: bool = True) -> V4CausalLM:
    """An eval-mode V4CausalLM with the checkpoint's weights in dtype ("float32", "bfloat16" or a torch dtype;
    the fp32 islands stay fp32). A V4.1 checkpoint with Engram layers also gets its tables from
    `engram_tables.safetensors` unless engram_tables=False (the rows then come from the memory service:
    `attach_engram_tables` with its client before the model runs)."""
    from model_worker.loading import load_engram_tables, resolve_dtype

    dtype = resolve_dtype(dtype)
    config = read_v4_config(path)
    with torch.device("meta"):
        model = V4CausalLM(config)
    tensors = {}
    for name, tensor in read_checkpoint(path).items():
        if name.startswith(("mtp.", "model.mtp.")):
            continue  # multi-token prediction: not used for generation
        ours = model_name(name)
        if ours in tensors:
            raise CheckpointError(f"checkpoint tensors {name!r} and another both map to {ours!r}")
        tensors[ours] = tensor
    load_state(model, tensors, dtype=dtype)
    if config.uses_engram and engram_tables:
        model.attach_engram_tables(load_engram_tables(path, config))
    return model.eval()
