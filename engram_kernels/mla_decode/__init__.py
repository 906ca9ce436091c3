"""Paged MLA decode attention over the latent KV cache, and the byte layout of that cache.

`layout` defines a token's cache row (bf16, or FP8 in FlashMLA's V3.2 layout) and packs/unpacks it;
`decode` holds the torch reference (`paged_mla_decode_ref`, the definition), the Triton entry point and
the dispatcher; `gathered` is the batched-torch form an engine step uses where the Triton kernel does
not run. Page allocation and the cache object itself live in `model_worker.engine`.
"""

from engram_kernels.mla_decode.decode import paged_mla_decode, paged_mla_decode_ref, paged_mla_decode_triton
from engram_kernels.mla_decode.gathered import DecodeGather, paged_mla_decode_gathered
from engram_kernels.mla_decode.layout import CACHE_FORMATS, LatentCacheLayout, pack_tokens, unpack_tokens

__all__ = [
    "CACHE_FORMATS",
    "DecodeGather",
    "LatentCacheLayout",
    "pack_tokens",
    "paged_mla_decode",
    "paged_mla_decode_gathered",
    "paged_mla_decode_ref",
    "paged_mla_decode_triton",
    "unpack_tokens",
]
