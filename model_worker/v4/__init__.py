"""DeepSeek-V4 ("Model1", `model_type: deepseek_v4`) in the model core: the math of transformers'
`DeepseekV4ForCausalLM`, written from its spec (docs/v4-model-spec.md), for full-sequence logits.

- `config.V4Config`: the checkpoint's config.json fields, with the defaults and derived values transformers uses.
- `rope`: the main and the YaRN-scaled compress RoPE, interleaved pairs on the trailing slice of a head.
- `compressor`: the compressed-entry pooling of CSA (overlapping windows, with the lightning indexer) and HCA.
- `attention.V4Attention`: one shared KV head read as key and value, sliding window + compressed entries,
  per-head sinks, the inverse rotation on the output, the grouped low-rank output projection.
- `moe.V4MoE`: learned (sqrtsoftplus or sigmoid) or hash-routed (`tid2eid`) experts with clamped SwiGLU.
- `model.V4CausalLM`: the decoder with mHC residual streams (`layers.mhc`, shared with our own models).

Not yet here: the engine (paged caches per layer type, the MODEL1 FP8 cache) - `load_v4_model` gives a model
for logits; the model worker refuses V4 checkpoints with a clear error until the engine serves them.
"""

from model_worker.v4.config import V4Config
from model_worker.v4.loading import load_v4_model
from model_worker.v4.model import V4CausalLM

__all__ = ["V4CausalLM", "V4Config", "load_v4_model"]
