"""The REST routes under /v1: agents, tasks (with their event streams), sessions, memories and API keys.

Each route is a thin translation from HTTP to a `RuntimeService` call for the caller's tenant; the
runtime decides what is valid and what exists. Another tenant's id answers exactly like a missing one.

Deliberately not here: auth and limits (`guards`), the OpenAI routes (`openai_routes`), health/metrics
(`app`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from runtime.agents import AGENT_NAME_PATTERN, AgentDefinition, MemoryKind
from runtime.api.errors import ApiError, error_responses
from runtime.api.guards import admin, caller
from runtime.api.sse import task_stream
from runtime.resources import (
    Agent,
    AgentList,
    AgentUpdate,
    ApiKey,
    ApiKeyCreate,
    ApiKeyList,
    Memory,
    MemoryCreate,
    MemoryHits,
    MemoryPage,
    MemoryPatch,
    MemorySearch,
    MessageCreate,
    NewApiKey,
    Session,
    Task,
    TaskCreate,
    TaskPage,
    TaskQuery,
    TaskTranscript,
)
from runtime.resources import ApiKey as Caller
from runtime.tasks import is_event_id

router = APIRouter(prefix="/v1", responses=error_responses(400, 401, 404, 409, 413, 422, 429, 503))
Key = Annotated[Caller, Depends(caller)]
AgentName = Annotated[str, Query(pattern=AGENT_NAME_PATTERN)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=256)]


def _service(request: Request):
    return request.app.state.service


# ---- agents ---------------------------------------------------------------------------------------------
@router.post("/agents", status_code=201, response_model=Agent, tags=["agents"])
async def create_agent(body: AgentDefinition, request: Request, key: Key) -> Agent:
    return await _service(request).catalog.create(key.tenant, body)


@router.get("/agents", response_model=AgentList, tags=["agents"])
async def list_agents(request: Request, key: Key) -> AgentList:
    return AgentList(data=await _service(request).catalog.list(key.tenant))


@router.get("/agents/{name}", response_model=Agent, tags=["agents"])
async def get_agent(name: str, request: Request, key: Key) -> Agent:
    return await _service(request).catalog.get(key.tenant, name)


@router.patch("/agents/{name}", response_model=Agent, tags=["agents"])
async def update_agent(name: str, body: AgentUpdate, request: Request, key: Key) -> Agent:
    return await _service(request).catalog.update(key.tenant, name, body)


@router.delete("/agents/{name}", status_code=204, tags=["agents"])
async def delete_agent(name: str, request: Request, key: Key) -> Response:
    await _service(request).delete_agent(key.tenant, name)
    return Response(status_code=204)


# ---- tasks ----------------------------------------------------------------------------------------------
async def _submit(request: Request, tenant: str, agent: str, text: str, conversation_id: str | None,
                  idempotency_key: str | None) -> Response:
    """201 with the new task, or 200 with the one an earlier request under this Idempotency-Key created. The
    task is serialised once here (it is a Task already; the hot path skips FastAPI's re-validation)."""
    service = _service(request)
    task, created = await service.tasks.submit(tenant, agent, text, conversation_id=conversation_id,
                                               idempotency_key=idempotency_key)
    if created:
        request.app.state.metrics.submitted.inc()
    return Response(task.model_dump_json(), status_code=201 if created else 200, media_type="application/json",
                    headers={"Location": f"/v1/tasks/{task.id}"})


@router.post("/tasks", status_code=201, response_model=Task, tags=["tasks"],
             responses={200: {"model": Task, "description": "the task an earlier request with this "
                              "Idempotency-Key created"}})
async def submit_task(body: TaskCreate, request: Request, key: Key, idempotency_key: IdempotencyKey = None):
    return await _submit(request, key.tenant, body.agent, body.input, body.session_id, idempotency_key)


@router.get("/tasks", response_model=TaskPage, tags=["tasks"])
async def list_tasks(request: Request, key: Key, query: Annotated[TaskQuery, Query()]) -> TaskPage:
    return await _service(request).tasks.list(key.tenant, **query.model_dump())


@router.get("/tasks/{task_id}", response_model=Task, tags=["tasks"])
async def get_task(task_id: str, request: Request, key: Key) -> Task:
    return await _service(request).tasks.get(key.tenant, task_id)


@router.get("/tasks/{task_id}/steps", response_model=TaskTranscript, tags=["tasks"])
async def get_task_steps(task_id: str, request: Request, key: Key) -> TaskTranscript:
    return await _service(request).tasks.transcript(key.tenant, task_id)


@router.post("/tasks/{task_id}/cancel", status_code=202, response_model=Task, tags=["tasks"])
async def cancel_task(task_id: str, request: Request, key: Key) -> Task:
    return await _service(request).tasks.cancel(key.tenant, task_id)


@router.get("/tasks/{task_id}/events", tags=["tasks"], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events: "
                             "step_started, memory_hits, model_tokens, tool_call, tool_result, step_committed, "
                             "then final or error; each with an id usable as Last-Event-ID"}})
async def task_events(task_id: str, request: Request, key: Key,
                      last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
                      after: Annotated[str | None, Query(max_length=64)] = None) -> StreamingResponse:
    service = _service(request)
    start = last_event_id or after or "0-0"
    tasks = service.tasks
    if not is_event_id(start):
        raise ApiError(422, f"Last-Event-ID: not an event id like '1700000000000-0': {start!r}", field="Last-Event-ID")
    await tasks.state(key.tenant, task_id)  # 404 before the stream opens
    release = request.app.state.stream_slots.acquire(key.id)  # 429 over the per-key bound

    async def body():
        try:
            async for chunk in task_stream(tasks, key.tenant, task_id, start):
                yield chunk
        finally:
            release()

    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(release),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- sessions -------------------------------------------------------------------------------------------
@router.get("/sessions/{session_id}", response_model=Session, tags=["sessions"])
async def get_session(session_id: str, request: Request, key: Key) -> Session:
    return await _service(request).tasks.conversation(key.tenant, session_id)


@router.post("/sessions/{session_id}/messages", status_code=201, response_model=Task, tags=["sessions"],
             responses={200: {"model": Task, "description": "the task an earlier request with this "
                              "Idempotency-Key created"}})
async def send_message(session_id: str, body: MessageCreate, request: Request, key: Key,
                       idempotency_key: IdempotencyKey = None):
    agent = await _service(request).tasks.conversation_agent(key.tenant, session_id)
    return await _submit(request, key.tenant, agent, body.input, session_id, idempotency_key)


# ---- memories -------------------------------------------------------------------------------------------
@router.post("/agents/{agent}/memories", status_code=201, response_model=Memory, tags=["memories"])
async def add_memory(agent: str, body: MemoryCreate, request: Request, key: Key) -> Memory:
    return await _service(request).add_memory(key.tenant, agent, body)


@router.get("/agents/{agent}/memories", response_model=MemoryPage, tags=["memories"])
async def list_memories(agent: str, request: Request, key: Key,
                        kind: Annotated[list[MemoryKind] | None, Query()] = None,
                        limit: Annotated[int, Query(ge=1, le=200)] = 50,
                        cursor: Annotated[str | None, Query(max_length=512)] = None) -> MemoryPage:
    return await _service(request).list_memories(key.tenant, agent, kinds=kind, limit=limit, cursor=cursor)


@router.post("/agents/{agent}/memories/search", response_model=MemoryHits, tags=["memories"])
async def search_memories(agent: str, body: MemorySearch, request: Request, key: Key) -> MemoryHits:
    return await _service(request).search_memories(key.tenant, agent, body)


@router.get("/agents/{agent}/memories/{memory_id}", response_model=Memory, tags=["memories"])
async def get_memory(agent: str, memory_id: str, request: Request, key: Key) -> Memory:
    return await _service(request).get_memory(key.tenant, agent, memory_id)


@router.patch("/agents/{agent}/memories/{memory_id}", response_model=Memory, tags=["memories"])
async def update_memory(agent: str, memory_id: str, body: MemoryPatch, request: Request, key: Key) -> Memory:
    return await _service(request).update_memory(key.tenant, agent, memory_id, body)


@router.delete("/agents/{agent}/memories/{memory_id}", status_code=204, tags=["memories"])
async def delete_memory(agent: str, memory_id: str, request: Request, key: Key) -> Response:
    await _service(request).delete_memory(key.tenant, agent, memory_id)
    return Response(status_code=204)


# ---- API keys (admin keys only) -------------------------------------------------------------------------
@router.post("/keys", status_code=201, response_model=NewApiKey, tags=["keys"], responses=error_responses(403))
async def create_key(body: ApiKeyCreate, request: Request,
                     _admin: Annotated[Caller, Depends(admin)]) -> NewApiKey:
    return await _service(request).keys.create(body.tenant, name=body.name, admin=body.admin)


@router.get("/keys", response_model=ApiKeyList, tags=["keys"], responses=error_responses(403))
async def list_keys(request: Request, _admin: Annotated[Caller, Depends(admin)],
                    tenant: Annotated[str | None, Query(max_length=200)] = None) -> ApiKeyList:
    return ApiKeyList(data=await _service(request).keys.list(tenant))


@router.delete("/keys/{key_id}", response_model=ApiKey, tags=["keys"], responses=error_responses(403))
async def revoke_key(key_id: str, request: Request, _admin: Annotated[Caller, Depends(admin)]) -> ApiKey:
    return await _service(request).keys.revoke(key_id)
