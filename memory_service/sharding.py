"""How a table's rows are split across N service replicas: contiguous, balanced row ranges.

The layout is a function of the row count and N alone, so every client and replica derives the same
one without coordination. Routing ids to shards is the client's job (`engram_client`).
"""

from __future__ import annotations

import torch


def shard_ranges(rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Shard i holds rows [i * rows // N, (i + 1) * rows // N): sizes differ by at most one."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows: expected an int >= 0, got {rows!r}")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards: expected an int >= 1, got {num_shards!r}")
    bounds = [i * rows // num_shards for i in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def shard_of(ids: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Index of the shard holding each id.  ids int64 [...] (all in range) -> int64 [...]"""
    starts = torch.tensor([lo for lo, _ in ranges[1:]], dtype=ids.dtype, device=ids.device)
    return torch.searchsorted(starts, ids, right=True)
