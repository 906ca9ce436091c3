"""Engram ops: n-gram hash ids from compressed token ids, and table row gather with FP8 dequant.

Each op has a torch reference (`*_ref`, the definition), a Triton kernel (`*_triton`) and a
dispatcher that picks one via `engram_kernels.dispatch.use_triton`. Building multipliers, primes and
tables is the model worker's job, not this package's.
"""

from engram_kernels.engram.gather import engram_gather, engram_gather_ref, engram_gather_triton
from engram_kernels.engram.hash import engram_hash, engram_hash_ref, engram_hash_triton

__all__ = [
    "engram_gather",
    "engram_gather_ref",
    "engram_gather_triton",
    "engram_hash",
    "engram_hash_ref",
    "engram_hash_triton",
]
