"""mHC (manifold-constrained hyper-connections) ops: split mixes into weights, collapse, expand+mix.

Each op has a torch reference (`*_ref`, the definition), a forward-only Triton kernel (`*_triton`,
imported lazily so this package loads without triton) and a dispatcher. Computing the mixes from
the residual streams (RMSNorm + projection) is the model layer's job (`model_worker.layers.mhc`).
"""

from engram_kernels.mhc.post import mhc_post, mhc_post_ref, mhc_post_triton
from engram_kernels.mhc.pre import mhc_pre, mhc_pre_ref, mhc_pre_triton
from engram_kernels.mhc.split import mhc_split, mhc_split_ref, mhc_split_triton

__all__ = [
    "mhc_post",
    "mhc_post_ref",
    "mhc_post_triton",
    "mhc_pre",
    "mhc_pre_ref",
    "mhc_pre_triton",
    "mhc_split",
    "mhc_split_ref",
    "mhc_split_triton",
]
