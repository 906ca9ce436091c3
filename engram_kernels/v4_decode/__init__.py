"""DeepSeek-V4 decode ops: the CSA lightning indexer's scores and top-k, and sparse attention over sliding
keys plus selected compressed entries with per-head sinks (docs/v4-model-spec.md §5.1-5.4).

`indexer` and `attention` hold the torch references (`*_ref`, the definitions), the Triton entry points
(`*_triton`, whose kernel modules import only when they run) and the dispatchers. Projections, RoPE,
the compressors and the caches belong to the model layer (`model_worker.v4`). `paged` is the same
attention reading its keys straight from MODEL1 FP8 pages of a shared pool (`mla_decode.model1_layout`).
"""

from engram_kernels.v4_decode.attention import (
    sparse_decode_attention,
    sparse_decode_attention_ref,
    sparse_decode_attention_triton,
)
from engram_kernels.v4_decode.indexer import (
    indexer_scores,
    indexer_scores_ref,
    indexer_scores_triton,
    indexer_topk,
    indexer_topk_ref,
    indexer_topk_triton,
    select_topk,
)
from engram_kernels.v4_decode.paged import (
    sparse_decode_attention_paged,
    sparse_decode_attention_paged_ref,
    sparse_decode_attention_paged_triton,
)

__all__ = [
    "indexer_scores",
    "indexer_scores_ref",
    "indexer_scores_triton",
    "indexer_topk",
    "indexer_topk_ref",
    "indexer_topk_triton",
    "select_topk",
    "sparse_decode_attention",
    "sparse_decode_attention_paged",
    "sparse_decode_attention_paged_ref",
    "sparse_decode_attention_paged_triton",
    "sparse_decode_attention_ref",
    "sparse_decode_attention_triton",
]
