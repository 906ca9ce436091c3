"""DeepSeek-V4 ("Model1", `model_type: deepseek_v4`) in the model core: the math of transformers'
`DeepseekV4ForCausalLM`, written from its spec (docs/v4-model-spec.md), for full-sequence logits.

- `config.V4Config`: the checkpoint's config.json fields, with the defaults and derived values transformers uses.
- `rope`: the main and the YaRN-scaled compress RoPE, interleaved pairs on the trailing slice of a head.
- `compressor`: the compressed-entry pooling of CSA (overlapping windows, with the lightning indexer) and HCA.
- `attention.V4Attention`: one shared KV head read as key and value, sliding window + compressed entries,
  per-head sinks, the inverse rotation on the output, the grouped low-rank output projection.
- `moe.V4MoE`: learned (sqrtsoftplus or sigmoid) or hash-routed (`tid2eid`) experts with clamped SwiGLU.
- `model.V4CausalLM`: the decoder with mHC residual streams (`layers.mhc`, shared with our own models).

- `kv_rows` / `page_pool`: where a decoding state keeps its rows: as they are, or as MODEL1 FP8 rows in pages of
  a pool shared by every sequence. `names`: checkpoint tensor names -> ours. `loading.load_v4_model`.

`V4CausalLM.forward(ids, state)` continues a sequence from a `V4State` and `decode` steps many sequences at
once; the engine serves V4 through `model_worker.engine.v4_runner` (docs/model-and-engine.md).
"""

from model_worker.v4.config import V4Config
from model_worker.v4.loading import load_v4_model
from model_worker.v4.model import V4CausalLM

__all__ = ["V4CausalLM", "V4Config", "load_v4_model"]
