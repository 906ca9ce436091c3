"""Session affinity for model-worker replicas, as plain data: which replica should take a session's next model
call, given the candidate replicas, their queue lengths and the replica that served the session last (whose
prefix cache holds the session's prompt so far). No Ray here: `router.SessionAffinityRouter` is the Serve
RequestRouter shell over it; this module only decides an order of preference."""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence


def rank_replicas(candidates: Sequence[str], loads: Mapping[str, int | None], last: str | None, *,
                  max_queue: int, session: str = "") -> list[str]:
    """The candidates (healthy replica ids) in order of preference.

    The session's last replica comes first while it is a candidate and its queue length is under max_queue;
    otherwise (and after it) the least loaded come first. loads: queue length per replica, None when not known
    (counted as 0: Serve probes a replica before sending it a request and skips a full one). Equal loads are
    ordered by a hash of (session, replica), so new sessions spread over the replicas and every decision is
    reproducible."""
    def load(replica: str) -> int:
        return loads.get(replica) or 0

    order = sorted(candidates, key=lambda r: (load(r), zlib.crc32(f"{session}\0{r}".encode())))
    if last is not None and last in order and load(last) < max_queue:
        order.remove(last)
        order.insert(0, last)
    return order


class SessionReplicas:
    """The replica that served each session last; beyond `capacity` sessions the least recently used are
    forgotten (their next call goes to the least loaded replica)."""

    def __init__(self, capacity: int = 100_000):
        if capacity < 1:
            raise ValueError(f"capacity: at least 1, got {capacity}")
        self.capacity = capacity
        self._last: OrderedDict[str, str] = OrderedDict()

    def get(self, session: str) -> str | None:
        return self._last.get(session)

    def record(self, session: str, replica: str) -> None:
        self._last[session] = replica
        self._last.move_to_end(session)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)

    def __len__(self) -> int:
        return len(self._last)
