"""The runtime as a Ray Serve application: memory service, model worker and API ingress as deployments.

The one package that imports Ray (`handles`: calls across replicas; `engram_rows`: Engram rows across the split;
`adapters`: the ingress's memory, model and OpenAI clients over handles; `router`: session affinity;
`deployments`). Each deployment is a thin shell over the plain classes `LocalRuntime` composes in one process:

- `MemoryServiceDeployment`: a `MemoryService` over an `AgentMemoryStore` (the SQL database + faiss);
  async `write/search/get/list/update/delete/forget_agent` forward to it. Optionally it also serves the
  Engram tables of a checkpoint (`engram_path`), whole or one row-range shard of `num_shards`, from a
  row-server actor it starts on its node (`engram_rows`): `engram_info(model)` names that actor, which
  workers call directly; `engram_lookup_many(model, {layer: hash_ids}) -> {layer: rows}` is the same
  lookup as a Serve request. A replica may serve only Engram tables (no `database_url`).
- `ModelWorkerDeployment`: one `ModelWorker`; `stream_complete` (an async generator of text deltas and a
  final record, for the orchestrator), the OpenAI handlers (`chat_completions`/`completions` answer
  one response; `*_stream` are async generators of chunks), `generate_ids`, `models()` and `info()`.
  Its handles route with `router.SessionAffinityRouter` (its `request_router_config`): a session's calls
  (the handle's `session_id`, which `HandleModelClient` sets from the session the orchestrator drives) go
  to the replica that served it before while that one is healthy and under `max_queue` requests, else to
  the least loaded (`affinity.rank_replicas`, Ray-free).
  With `engram="remote"` it loads the checkpoint without its Engram tables and gets the rows from the
  memory deployment(s) given as `engram_shards` (shard i of N at index i) through a `HandleEngramClient`:
  one call per shard per engine step for all Engram layers, started before the layers run, to the shard's
  row-server actor (FP8 rows on the wire; `engram_transport="serve"`: a Serve request, fp32 rows). A lookup
  that cannot reach the memory service raises a RuntimeError naming it, which fails the step's requests
  (nothing is computed with missing rows); `check_health` then fails while the service stays unreachable.
- `ApiIngress`: the FastAPI app of `runtime.api.create_app` through `serve.ingress`, over a
  `RuntimeService` built in the replica (its async constructor, on the replica's event loop: the
  session store's redis.asyncio client belongs to that loop) from Redis, the orchestrator, and
  adapters over the two other deployments' handles (`HandleMemory`, `HandleModelClient`,
  `WorkerProxy`). Replicas share sessions, tasks and API keys through Redis (so `redis_url` is
  required), and each runs the task runner: leases decide which replica runs a session.

`build_app(args)` is the application builder for `serve run runtime.serve:build_app` and
`deploy/serve_config.yaml`. Errors raised in another replica come back as `RayTaskError`; the adapters
re-raise the original exception (`.cause`), so the API maps them as in one process (404, 400 ...).
`OpenAIError` does not survive pickling (its constructor takes more than its args), so the worker
deployment returns it as an `ErrorRecord` that the ingress raises again.

Not here (yet): multi-node placement of the checkpoint (the ingress reads the tokenizer from `model_path`
itself).
"""

from runtime.serve.adapters import HandleMemory, HandleModelClient, SessionOrchestrator, WorkerProxy, current_session
from runtime.serve.affinity import SessionReplicas, rank_replicas
from runtime.serve.deployments import (
    ApiIngress,
    MemoryServiceDeployment,
    ModelWorkerDeployment,
    build_app,
    deploy,
    shutdown,
)
from runtime.serve.engram_rows import HandleEngramClient, MemoryServiceUnavailable
from runtime.serve.handles import ErrorRecord
from runtime.serve.router import SessionAffinityRouter

__all__ = ["ApiIngress", "ErrorRecord", "HandleEngramClient", "HandleMemory", "HandleModelClient",
           "MemoryServiceDeployment", "MemoryServiceUnavailable", "ModelWorkerDeployment", "SessionAffinityRouter",
           "SessionOrchestrator", "SessionReplicas", "WorkerProxy", "build_app", "current_session", "deploy",
           "rank_replicas", "shutdown"]
