"""Bounded exponential backoff around one Redis operation, for connection loss and server restarts.

Only transport failures are retried (connection refused or reset, timeouts, a server still loading its
AOF, a read-only replica during failover); the operation receives the attempt number so an idempotent
script can tell a first try from a retry. Errors from the store's own logic are never retried.

Deliberately not here: making the operation idempotent (the Lua scripts do that).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.exceptions as redis_errors

T = TypeVar("T")
log = logging.getLogger(__name__)

RETRYABLE_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.ReadOnlyError,
                    ConnectionError, OSError)


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Delay before retry `attempt` (0-based): base * 2^attempt, capped, with jitter in [1/2, 1]."""
    return min(cap_s, base_s * 2 ** attempt) * (0.5 + random.random() / 2)


async def with_retry(operation: Callable[[int], Awaitable[T]], *, attempts: int, base_s: float,
                     cap_s: float, what: str = "redis operation") -> T:
    """Run `operation(attempt)` until it succeeds or `attempts` transport failures in a row."""
    for attempt in range(attempts):
        try:
            return await operation(attempt)
        except RETRYABLE_ERRORS as exc:
            if attempt == attempts - 1:
                raise
            delay = backoff_s(attempt, base_s, cap_s)
            log.warning("%s failed (%s: %s); retry %d/%d in %.3f s", what, type(exc).__name__, exc,
                        attempt + 1, attempts - 1, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # attempts >= 1 is checked by the store
