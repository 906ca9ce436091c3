"""Keep a session's lease alive while its owner works, and stop the work the moment the lease is gone.

`run_under_lease` runs a session's work (a coroutine) beside a heartbeat. The heartbeat survives Redis
outages: a failed heartbeat is retried with exponential backoff for as long as the lease can still be
live, judged on this process's monotonic clock from when the last successful heartbeat (or the claim) was
sent, a conservative bound, since Redis counts the lease from when the call arrived. When the lease is taken by
another owner, found stale, or runs out while Redis is unreachable, the work is cancelled at once (its
tools with it), nothing more is committed (fencing tokens refuse any write that raced the cancel), the
reason is logged, and `LeaseLost` is raised. A heartbeat that finds the session finished is not a loss when
the finishing commit was made under this lease (the same fencing token): the work committed its terminal
step and is only winding down (reading the state back), so it runs to its end.

Deliberately not here: claiming or releasing the lease, or what the work does (the orchestrator).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from runtime.sessions import LeaseLost, SessionFinished, SessionStore
from runtime.sessions.retry import RETRYABLE_ERRORS, backoff_s

T = TypeVar("T")
log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task, *, repeat_s: float = 1.0) -> None:
    """Cancel `task` and wait until it is done, cancelling again every `repeat_s` (one cancel() can be lost
    in Python 3.11 when the awaited operation completes at the same moment)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=repeat_s)
    if not task.cancelled():
        task.exception()  # retrieved: not reported again at exit


async def keep_lease(store: SessionStore, session_id: str, owner: str, token: int, *, lease_ms: int,
                     heartbeat_s: float, valid_until: float) -> str | None:
    """Heartbeat until the lease is lost; returns why, or None when the session finished (a terminal commit:
    nobody holds its lease any more). `valid_until`: monotonic time by which the lease (as last extended) has
    surely expired."""
    lease_s, failures = lease_ms / 1000, 0
    delay = heartbeat_s
    while True:
        await asyncio.sleep(max(0.0, min(delay, valid_until - time.monotonic())))
        sent = time.monotonic()
        if sent >= valid_until:
            return (f"lease expired after {failures} failed heartbeat(s) (Redis unreachable for longer than "
                    f"the {lease_ms} ms lease)")
        try:
            async with asyncio.timeout(valid_until - sent):
                await store.heartbeat(session_id, owner, token, lease_ms)
        except SessionFinished:
            return None
        except LeaseLost as exc:
            return f"lease lost ({exc})"
        except (TimeoutError, *RETRYABLE_ERRORS) as exc:
            failures += 1
            delay = backoff_s(failures, heartbeat_s / 4, heartbeat_s)
            log.warning("session %s: heartbeat failed (%s: %s); retrying in %.2f s while the lease lasts "
                        "(%.1f s more)", session_id, type(exc).__name__, exc, delay, valid_until - sent)
            continue
        valid_until, failures, delay = sent + lease_s, 0, heartbeat_s


async def run_under_lease(store: SessionStore, session_id: str, owner: str, token: int,
                          work: Coroutine[Any, Any, T], *, lease_ms: int, heartbeat_s: float,
                          valid_until: float) -> T:
    """Run `work` while heartbeating the lease; LeaseLost (after cancelling `work`) when the lease is lost."""
    worker = asyncio.create_task(work)
    keeper = asyncio.create_task(keep_lease(store, session_id, owner, token, lease_ms=lease_ms,
                                            heartbeat_s=heartbeat_s, valid_until=valid_until))
    try:
        await asyncio.wait({worker, keeper}, return_when=asyncio.FIRST_COMPLETED)
        if worker.done():
            return worker.result()
        reason = keeper.result()
        if reason is None:  # finished: by this work's own terminal commit, or by a later owner of the lease?
            state = await store.state(session_id)
            if state.fencing_token == token:
                return await worker
            reason = f"session finished under a later lease (token {state.fencing_token}, ours {token})"
        log.warning("session %s: %s; stopping its work here (nothing more is committed by %s)", session_id,
                    reason, owner)
        await cancel_and_wait(worker)
        raise LeaseLost(f"session {session_id}: {reason}")
    finally:
        for task in (keeper, worker):
            await cancel_and_wait(task)
