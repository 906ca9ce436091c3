"""Session affinity on Ray Serve: a RequestRouter (configured on the model-worker deployment through
`request_router_config`) that sends the model calls of one session to the replica that served it before,
whose prefix cache holds the session's prompt so far, while that replica is healthy and not overloaded, and
otherwise to the least loaded one. The session is the handle call's `session_id` option (Serve's
RequestMetadata.session_id; `HandleModelClient` sets it). The decision is `affinity.rank_replicas`; this
class only feeds it Serve's candidates and cached queue lengths and records where each session went.

A router lives in each process holding a handle (each ingress replica), so its memory of sessions is per
process: a session that moves to another ingress replica starts over on the least loaded worker."""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from runtime.serve.affinity import SessionReplicas, rank_replicas

DEFAULT_MAX_QUEUE = 8


class SessionAffinityRouter(RequestRouter):
    """request_router_kwargs: max_queue (a session leaves its replica when that replica has this many
    requests ongoing or queued), max_sessions (sessions remembered, least recently used forgotten)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initialize_state()

    def initialize_state(self, max_queue: int = DEFAULT_MAX_QUEUE, max_sessions: int = 100_000, **_):
        if max_queue < 1:
            raise ValueError(f"max_queue: at least 1, got {max_queue}")
        self.max_queue = max_queue
        self.sessions = SessionReplicas(max_sessions)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """One replica per rank, in rank_replicas' order: Serve tries them in turn and skips a full one."""
        session = pending_request.metadata.session_id if pending_request is not None else ""
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        loads = {rid: cache.get(r.replica_id) for rid, r in by_id.items()}
        last = self.sessions.get(session) if session else None
        order = rank_replicas(list(by_id), loads, last, max_queue=self.max_queue, session=session)
        return [[by_id[rid]] for rid in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        session = pending_request.metadata.session_id
        if session:
            self.sessions.record(session, replica_id.unique_id)
