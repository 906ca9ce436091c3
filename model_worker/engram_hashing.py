"""Per-layer Engram hash parameters (multipliers, primes, offsets) and the hasher that applies them.

Facts from the V4.1 semantics: multipliers come from numpy's default_rng(10007 * layer_id); primes
are the smallest unused primes above engram_vocab_size - 1, one per (n-gram size, head), with one
`seen` set shared by all layers (in the order the layer ids are given); offsets are the running sum
of a layer's primes, so hash ids of a layer index rows 0..sum(primes)-1 of that layer's own table.
Compressing raw token ids into compressed ids is the tokenizer's job, not this module's.
"""

from __future__ import annotations

import numpy as np
import torch

from engram_kernels.engram import engram_hash

MULTIPLIER_SEED_STRIDE = 10007


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def engram_multipliers(layer_id: int, compressed_vocab_size: int, max_ngram_size: int) -> np.ndarray:
    """Odd int64 multipliers of one Engram layer.  -> [max_ngram_size]"""
    _check_positive("layer_id", layer_id, minimum=0)
    _check_positive("compressed_vocab_size", compressed_vocab_size)
    _check_positive("max_ngram_size", max_ngram_size, minimum=2)
    rng = np.random.default_rng(MULTIPLIER_SEED_STRIDE * int(layer_id))
    bound = max(1, (int(np.iinfo(np.int64).max) // int(compressed_vocab_size)) // 2)
    return rng.integers(0, bound, size=(int(max_ngram_size),), dtype=np.int64) * 2 + 1


def _is_prime(n: int) -> bool:
    """Deterministic trial division (n stays near engram_vocab_size, so sqrt(n) is small)."""
    if n < 2:
        return False
    if n % 2 == 0 or n % 3 == 0:
        return n in (2, 3)
    f = 5
    while f * f <= n:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


def engram_primes(
    layer_ids: list[int], max_ngram_size: int, n_heads: int, engram_vocab_size: int
) -> dict[int, np.ndarray]:
    """Distinct hash-table primes per layer.  -> {layer_id: int64 [max_ngram_size - 1, n_heads]}"""
    layer_ids = [int(layer) for layer in layer_ids]
    if len(set(layer_ids)) != len(layer_ids) or any(layer < 0 for layer in layer_ids):
        raise ValueError(f"layer_ids: expected distinct non-negative layer indices, got {layer_ids}")
    _check_positive("max_ngram_size", max_ngram_size, minimum=2)
    _check_positive("n_heads", n_heads)
    _check_positive("engram_vocab_size", engram_vocab_size)
    seen: set[int] = set()
    primes = {}
    for layer in layer_ids:
        per_ngram = []
        for _ in range(2, max_ngram_size + 1):
            current = engram_vocab_size - 1
            heads = []
            for _ in range(n_heads):
                current += 1
                while current in seen or not _is_prime(current):
                    current += 1
                seen.add(current)
                heads.append(current)
            per_ngram.append(heads)
        primes[layer] = np.asarray(per_ngram, dtype=np.int64)
    return primes


class EngramHasher:
    """Hash ids for every Engram layer of a model; tensors are cached per device."""

    def __init__(
        self,
        layer_ids: list[int],
        max_ngram_size: int,
        n_heads: int,
        engram_vocab_size: int,
        compressed_vocab_size: int,
        pad_id: int,
    ) -> None:
        _check_positive("pad_id", pad_id, minimum=0)
        if pad_id >= compressed_vocab_size:
            raise ValueError(f"pad_id: must be < compressed_vocab_size {compressed_vocab_size}, got {pad_id}")
        self.layer_ids = [int(layer) for layer in layer_ids]
        self.max_ngram_size = int(max_ngram_size)
        self.n_heads = int(n_heads)
        self.pad_id = int(pad_id)
        self.compressed_vocab_size = int(compressed_vocab_size)
        self.n_hash_cols = (self.max_ngram_size - 1) * self.n_heads
        primes = engram_primes(self.layer_ids, max_ngram_size, n_heads, engram_vocab_size)
        self.primes: dict[int, torch.Tensor] = {}  # [n_hash_cols] per layer, (n-gram, head) order
        self.offsets: dict[int, torch.Tensor] = {}  # [n_hash_cols] per layer
        self.multipliers: dict[int, torch.Tensor] = {}  # [max_ngram_size] per layer
        for layer in self.layer_ids:
            flat = torch.from_numpy(primes[layer].reshape(-1))
            self.primes[layer] = flat
            self.offsets[layer] = torch.cumsum(flat, 0) - flat
            self.multipliers[layer] = torch.from_numpy(
                engram_multipliers(layer, compressed_vocab_size, max_ngram_size)
            )
        self._on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}

    def _check_layer(self, layer_id: int) -> None:
        if layer_id not in self.primes:
            raise ValueError(f"layer_id: {layer_id} is not an Engram layer {self.layer_ids}")

    def table_rows(self, layer_id: int) -> int:
        """Rows the layer's table needs: one past the largest hash id (sum of its primes)."""
        self._check_layer(layer_id)
        return int(self.primes[layer_id].sum())

    def _params(self, layer_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (layer_id, device)
        if key not in self._on_device:
            params = (self.multipliers[layer_id], self.primes[layer_id], self.offsets[layer_id])
            self._on_device[key] = tuple(t.to(device) for t in params)
        return self._on_device[key]

    def hash(
        self, layer_id: int, compressed_ids: torch.Tensor, valid_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hash ids of one layer.  compressed_ids int64 [B, T] -> int64 [B, T, n_hash_cols]"""
        self._check_layer(layer_id)
        if not isinstance(compressed_ids, torch.Tensor):
            raise TypeError(f"compressed_ids: expected a torch.Tensor, got {type(compressed_ids).__name__}")
        if compressed_ids.numel() and not compressed_ids.is_floating_point():
            # refused before hashing: an id past the vocabulary would hash (and overflow) silently to some row
            low, high = (int(v) for v in torch.aminmax(compressed_ids))
            if low < 0 or high >= self.compressed_vocab_size:
                raise ValueError(f"compressed_ids: token ids must lie in [0, {self.compressed_vocab_size}), "
                                 f"got min {low} max {high}")
        multipliers, primes, offsets = self._params(layer_id, compressed_ids.device)
        return engram_hash(compressed_ids, multipliers, primes, offsets, self.pad_id, valid_mask)


def hasher_for(config, token_map: torch.Tensor) -> EngramHasher:
    """The hasher of a model config with `engram_*` fields (ours or V4.1's); token_map [vocab] int64 maps raw
    token ids to compressed ones (the pad id is the compressed id of `engram_pad_token_id`)."""
    return EngramHasher(config.engram_layer_ids, config.engram_max_ngram_size, config.engram_n_heads,
                        config.engram_vocab_size, config.engram_num_embeddings,
                        int(token_map[config.engram_pad_token_id]))


def lookup_rows(hasher: EngramHasher, tables, layer_ids, compressed: torch.Tensor,
                valid: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: rows [B, T, cols * head_dim]} for compressed ids [B, T] (valid bool [B, T]) from `tables` (an
    EngramTableClient); raises if no tables are attached."""
    if tables is None:
        raise RuntimeError("this model has Engram layers: attach_engram_tables() before running it")
    return {layer: tables.lookup(layer, hasher.hash(layer, compressed, valid)).flatten(-2) for layer in layer_ids}
