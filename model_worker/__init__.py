"""Model worker: DeepSeek MLA + mHC + Engram models (config, layers, weights, tokenizer).

Public API (stable): `load_model`, `save_model`, `load_tokenizer`, `ModelConfig`, `CausalLM`,
`build_random_model`. No Ray imports anywhere below this package.
"""

from model_worker.config import ModelConfig
from model_worker.errors import CheckpointError, ConfigError
from model_worker.loading import build_random_model, load_model, save_model
from model_worker.model import CausalLM, PrefillOutput


def load_tokenizer(path):
    """Load `tokenizer.json` (+ `tokenizer_config.json`) from a checkpoint directory."""
    from model_worker.tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["CausalLM", "CheckpointError", "ConfigError", "ModelConfig", "PrefillOutput", "build_random_model",
           "load_model", "load_tokenizer", "save_model"]
