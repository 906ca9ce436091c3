"""The SDK's contract, one suite run twice: against `AsyncClient` over HTTP on a real server, and against
`LocalRuntime`'s in-process namespaces (conftest's `backend`). Each `async def scenario(sdk)` knows nothing of its
side, so agent code gets the same resources, defaults and typed errors from either. The last tests are HTTP-only
(retries of a dropped submit, an unreachable server, a bad key) or use the synchronous `Client`."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from runtime.resources import Agent, Memory, MemoryHit, MemoryPage, Session, Task, TaskEvent, TaskPage, TaskTranscript
from runtime.sdk import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    ConnectionFailed,
    EngramError,
    InvalidRequestError,
    NotFoundError,
    TaskTimeout,
)
from tests.runtime.crash_worker import CALLS_PER_STEP, TOOL_STEPS, expected_memory_texts
from tests.runtime.sdk.conftest import SlowModel, free_port

TOOLS = ["memory_write", "calculator"]
FINAL_ANSWER = f"recorded {TOOL_STEPS * CALLS_PER_STEP} facts"
WAIT_S = 30.0


# ---- helpers (side-agnostic) ------------------------------------------------------------------------------
async def raises(cls: type[EngramError], awaitable) -> EngramError:
    """Await; it must raise exactly `cls` (with that class's HTTP status). Returns the error."""
    try:
        result = await awaitable
    except EngramError as exc:
        assert type(exc) is cls, f"expected {cls.__name__}, got {type(exc).__name__}: {exc}"
        assert exc.status == cls.status, (exc.status, exc)
        assert exc.message, exc
        return exc
    raise AssertionError(f"expected {cls.__name__}, got a result: {result!r}")


async def collect(sdk, task_id: str, *, after: str | None = None) -> list[TaskEvent]:
    return [event async for event in sdk.tasks.events(task_id, after=after)]


def durable(events) -> list[tuple]:  # all but streamed tokens: those are for live readers (a commit drops them)
    return [(e.id, e.type, e.data) for e in events if e.type != "model_tokens"]


def event_key(event_id: str) -> tuple[int, int]:
    return tuple(int(part) for part in event_id.split("-"))


async def make_scribe(sdk, name: str = "scribe") -> Agent:
    return await sdk.agents.create(name, "Record facts about the task, then answer.", tools=TOOLS,
                                   limits={"max_steps": 10})


async def wait_until(predicate, timeout_s: float = WAIT_S, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while not (result := await predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval_s)
    return result


# ---- agents -----------------------------------------------------------------------------------------------
async def agents_crud(sdk) -> None:
    builtin = await sdk.agents.list()
    assert all(isinstance(a, Agent) for a in builtin)
    assert [a.name for a in builtin] == ["assistant"]
    assistant = await sdk.agents.get("assistant")
    assert assistant.builtin and assistant == builtin[0]

    created = await sdk.agents.create("helper", "Help out.", tools=TOOLS, limits={"max_steps": 5},
                                      memory={"k": 3})
    assert isinstance(created, Agent)
    assert (created.name, created.instructions, created.tools, created.model) == ("helper", "Help out.", TOOLS,
                                                                                   "default")
    assert created.limits.max_steps == 5 and created.memory.k == 3 and not created.builtin
    assert created.created_ms > 0 and created.updated_ms == created.created_ms
    assert await sdk.agents.get("helper") == created
    assert [a.name for a in await sdk.agents.list()] == ["assistant", "helper"]

    await raises(ConflictError, sdk.agents.create("helper", "Again.", tools=TOOLS))
    await raises(ConflictError, sdk.agents.create("assistant", "Mine now.", tools=TOOLS))

    updated = await sdk.agents.update("helper", instructions="Help more.", limits={"max_steps": 7})
    assert (updated.instructions, updated.limits.max_steps, updated.tools) == ("Help more.", 7, TOOLS)
    assert updated.created_ms == created.created_ms and updated.updated_ms >= created.updated_ms
    assert updated.memory.k == 3  # untouched fields stay
    assert await sdk.agents.get("helper") == updated

    await raises(ConflictError, sdk.agents.update("assistant", instructions="Be someone else."))
    await raises(ConflictError, sdk.agents.delete("assistant"))
    assert (await sdk.agents.get("assistant")) == assistant
    await raises(NotFoundError, sdk.agents.update("ghost", instructions="Boo."))

    assert await sdk.agents.delete("helper") is None
    await raises(NotFoundError, sdk.agents.get("helper"))
    await raises(NotFoundError, sdk.agents.delete("helper"))
    assert [a.name for a in await sdk.agents.list()] == ["assistant"]


def test_agents_crud(backend):
    backend.run(agents_crud)


async def validation_errors(sdk) -> list[tuple[str, int, str | None, str]]:
    """Every invalid request of the scenario: its (error class, status, field, message), in order."""
    seen = []

    async def invalid(awaitable, field: str | None) -> None:
        exc = await raises(InvalidRequestError, awaitable)
        assert exc.field == field, (exc.field, exc.message)
        seen.append((type(exc).__name__, exc.status, exc.field, exc.message))

    await invalid(sdk.agents.create("badtools", "x", tools=["memory_write", "no_such_tool"]), "tools")
    await invalid(sdk.agents.create("badlimit", "x", tools=TOOLS, limits={"max_steps": 0}), "limits.max_steps")
    await invalid(sdk.agents.create("badlimit", "x", tools=TOOLS, limits={"max_stepz": 3}), "limits.max_stepz")
    await invalid(sdk.agents.create("Bad Name!", "x", tools=TOOLS), "name")
    await invalid(sdk.agents.create("blank", "   ", tools=TOOLS), "instructions")
    assert [a.name for a in await sdk.agents.list()] == ["assistant"]  # nothing was created

    await make_scribe(sdk, "valid")
    await invalid(sdk.agents.update("valid", tools=["no_such_tool"]), "tools")
    await invalid(sdk.agents.update("valid", limits={"max_steps": 0}), "limits.max_steps")
    assert (await sdk.agents.get("valid")).tools == TOOLS  # unchanged

    await invalid(sdk.tasks.submit("", agent="valid"), "input")
    await invalid(sdk.tasks.submit("x" * 32_001, agent="valid"), "input")
    await invalid(sdk.tasks.submit("hello", agent="Not A Slug!"), "agent")
    await invalid(sdk.tasks.submit("hello", agent="valid", session_id="not a session id!"), "session_id")
    await invalid(sdk.sessions.send("sess_doesnotexist", ""), "input")  # the body is checked first
    await invalid(sdk.tasks.list(cursor="not-a-cursor"), "cursor")
    await invalid(sdk.memories.add("valid", ""), "text")
    await invalid(sdk.memories.search("valid", "anything", k=0), "k")
    assert (await sdk.tasks.list()).data == []  # no task was created
    return seen


def test_validation_errors(backend):
    backend.run(validation_errors)


def test_validation_errors_are_identical_on_both_sides(make_backend):
    assert make_backend("http").run(validation_errors) == make_backend("local").run(validation_errors)


async def list_query_errors(sdk) -> None:
    for kwargs, field in (({"limit": 0}, "limit"), ({"limit": 201}, "limit"), ({"status": "bogus"}, "status"),
                          ({"agent": "Not A Slug!"}, "agent"), ({"created_after_ms": -1}, "created_after_ms")):
        exc = await raises(InvalidRequestError, sdk.tasks.list(**kwargs))
        assert exc.field == field, (kwargs, exc.field, exc.message)


def test_task_list_query_errors(backend):
    backend.run(list_query_errors)


# ---- tasks ------------------------------------------------------------------------------------------------
async def task_lifecycle(sdk) -> None:
    await make_scribe(sdk)
    task = await sdk.tasks.submit("alpha", agent="scribe")
    assert isinstance(task, Task)
    assert (task.agent, task.input, task.final_answer, task.error) == ("scribe", "alpha", None, None)
    assert task.status in ("pending", "running") and not task.done
    assert task.id.startswith("task_") and task.session_id.startswith("sess_")

    done = await sdk.tasks.wait(task.id, timeout=WAIT_S)
    assert isinstance(done, Task) and done.done
    assert (done.id, done.status, done.final_answer, done.step_count) == (task.id, "completed", FINAL_ANSWER,
                                                                          TOOL_STEPS + 1)
    assert done.created_ms == task.created_ms and done.updated_ms >= task.updated_ms
    assert await sdk.tasks.get(task.id) == done
    assert (await sdk.tasks.wait(task.id, timeout=1)) == done  # a finished task returns at once

    transcript = await sdk.tasks.steps(task.id)
    assert isinstance(transcript, TaskTranscript)
    assert transcript.model_dump(exclude={"steps", "summary"}) == done.model_dump()
    assert [s.index for s in transcript.steps] == list(range(TOOL_STEPS + 1))
    assert [s.kind for s in transcript.steps] == ["action"] * TOOL_STEPS + ["final"]
    written = [obs["arguments"]["text"] for step in transcript.steps for obs in step.observations]
    assert written == expected_memory_texts("alpha")
    assert all(obs["tool"] == "memory_write" for step in transcript.steps for obs in step.observations)
    assert transcript.steps[-1].action == {"type": "final", "answer": FINAL_ANSWER}

    # the memories it wrote are the agent's
    texts = {m.text for m in (await sdk.memories.list("scribe", kind="fact")).data}
    assert texts == set(expected_memory_texts("alpha"))

    # filters
    assert [t.id for t in (await sdk.tasks.list()).data] == [task.id]
    assert [t.id for t in (await sdk.tasks.list(agent="scribe")).data] == [task.id]
    assert [t.id for t in (await sdk.tasks.list(status="completed")).data] == [task.id]
    assert (await sdk.tasks.list(status="failed")).data == []
    assert (await sdk.tasks.list(agent="assistant")).data == []
    assert (await sdk.tasks.list(created_after_ms=done.created_ms + 60_000)).data == []
    assert [t.id for t in (await sdk.tasks.list(created_before_ms=done.created_ms + 1)).data] == [task.id]


def test_task_submit_wait_get_steps_list(backend):
    backend.run(task_lifecycle)


async def task_pagination(sdk) -> None:
    await make_scribe(sdk)
    await make_scribe(sdk, "other")
    submitted = [(await sdk.tasks.submit(f"job {i}", agent="scribe")).id for i in range(5)]
    odd_one = (await sdk.tasks.submit("elsewhere", agent="other")).id
    for task_id in [*submitted, odd_one]:
        assert (await sdk.tasks.wait(task_id, timeout=WAIT_S)).status == "completed"

    async def pages(**filters) -> tuple[list[str], list[int]]:
        ids, sizes, cursor = [], [], None
        while True:
            page = await sdk.tasks.list(limit=2, cursor=cursor, **filters)
            assert isinstance(page, TaskPage)
            ids += [t.id for t in page.data]
            sizes.append(len(page.data))
            if page.next_cursor is None:
                return ids, sizes
            cursor = page.next_cursor
            assert len(sizes) < 10, "pagination does not end"

    ids, sizes = await pages(agent="scribe")
    assert ids == submitted[::-1]  # every task once, newest first
    assert sizes == [2, 2, 1]
    ids, _ = await pages()
    assert ids == [odd_one, *submitted[::-1]]
    ids, _ = await pages(status="completed", agent="other")
    assert ids == [odd_one]
    assert [t.id for t in (await sdk.tasks.list(limit=3)).data] == [odd_one, *submitted[::-1][:2]]


def test_task_list_filters_and_cursor_pagination(backend):
    backend.run(task_pagination)


async def task_cancel(sdk) -> None:
    await make_scribe(sdk)
    task = await sdk.tasks.submit("slow one", agent="scribe")
    await raises(TaskTimeout, sdk.tasks.wait(task.id, timeout=0.2))
    await wait_until(lambda: _status_is(sdk, task.id, "running"))
    answer = await sdk.tasks.cancel(task.id)
    assert isinstance(answer, Task) and answer.id == task.id
    cancelled = await sdk.tasks.wait(task.id, timeout=WAIT_S)
    assert cancelled.status == "cancelled" and cancelled.final_answer is None
    assert cancelled.step_count < TOOL_STEPS + 1
    assert "cancel" in (cancelled.error or "")
    events = await collect(sdk, task.id)
    assert events[-1].type == "error" and events[-1].terminal
    assert [e.type for e in events].count("final") == 0
    assert (await sdk.tasks.cancel(task.id)).status == "cancelled"  # cancelling a finished task changes nothing
    assert [t.id for t in (await sdk.tasks.list(status="cancelled")).data] == [task.id]


async def _status_is(sdk, task_id: str, status: str) -> bool:
    return (await sdk.tasks.get(task_id)).status == status


def test_task_cancel(backend):
    backend.run(task_cancel, model=SlowModel(0.5))


# ---- events -----------------------------------------------------------------------------------------------
REQUIRED_EVENT_TYPES = {"step_started", "tool_call", "tool_result", "step_committed", "final"}


async def task_events(sdk) -> None:
    await make_scribe(sdk)
    task = await sdk.tasks.submit("stream me", agent="scribe")
    live = await collect(sdk, task.id)  # followed while the task runs
    assert all(isinstance(e, TaskEvent) and e.task_id == task.id for e in live)
    keys = [event_key(e.id) for e in live]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "event ids must strictly increase"
    types = [e.type for e in live]
    assert REQUIRED_EVENT_TYPES <= set(types), types
    assert types[0] == "step_started" and types[-1] == "final"
    assert [e.terminal for e in live] == [False] * (len(live) - 1) + [True]
    assert live[-1].data.get("answer") == FINAL_ANSWER
    assert types.count("step_committed") == TOOL_STEPS + 1
    assert types.count("tool_call") == types.count("tool_result") == TOOL_STEPS * CALLS_PER_STEP
    calls = [e.data for e in live if e.type == "tool_call"]
    assert [c["arguments"]["text"] for c in calls] == expected_memory_texts("stream me")

    # the stream replays from the start once the task is done, and resumes exactly after a given id
    for mid in (None, 1, len(live) // 2, len(live) - 2):  # a finished step's tokens are gone, nothing else
        tail = await collect(sdk, task.id, after=None if mid is None else live[mid].id)
        assert [(e.id, e.type, e.data) for e in tail] == durable(live if mid is None else live[mid + 1:])

    await raises(NotFoundError, collect(sdk, "task_doesnotexist"))
    await raises(InvalidRequestError, collect(sdk, task.id, after="not-an-id"))


def test_task_events(backend):
    backend.run(task_events)


async def events_after_the_end(sdk) -> None:
    await make_scribe(sdk)
    task = await sdk.tasks.submit("short", agent="scribe")
    events = await collect(sdk, task.id)
    try:  # nothing follows the terminal event, and the stream says so without hanging
        assert await asyncio.wait_for(collect(sdk, task.id, after=events[-1].id), 5) == []
    except TimeoutError:
        raise AssertionError("a stream resumed after the terminal event of a finished task did not end "
                             "within 5 s") from None


def test_events_after_the_terminal_event_end_at_once(backend):
    backend.run(events_after_the_end)


# ---- idempotency ------------------------------------------------------------------------------------------
async def idempotency(sdk) -> None:
    await make_scribe(sdk)
    first = await sdk.tasks.submit("once", agent="scribe", idempotency_key="k")
    again = await sdk.tasks.submit("once", agent="scribe", idempotency_key="k")
    assert again.id == first.id and again.session_id == first.session_id
    await raises(ConflictError, sdk.tasks.submit("something else", agent="scribe", idempotency_key="k"))
    await raises(ConflictError, sdk.tasks.submit("once", agent="assistant", idempotency_key="k"))
    await sdk.tasks.wait(first.id, timeout=WAIT_S)
    after = await sdk.tasks.submit("once", agent="scribe", idempotency_key="k")  # also once it has finished
    assert (after.id, after.status) == (first.id, "completed")
    other = await sdk.tasks.submit("once", agent="scribe", idempotency_key="k2")
    assert other.id != first.id
    assert sorted(t.id for t in (await sdk.tasks.list()).data) == sorted([first.id, other.id])
    await sdk.tasks.wait(other.id, timeout=WAIT_S)


def test_idempotent_submit(backend):
    backend.run(idempotency)


# ---- sessions ---------------------------------------------------------------------------------------------
async def session_conversation(sdk) -> None:
    await make_scribe(sdk)
    first = await sdk.tasks.submit("first", agent="scribe")
    assert (await sdk.tasks.wait(first.id, timeout=WAIT_S)).status == "completed"
    second = await sdk.sessions.send(first.session_id, "second")
    assert isinstance(second, Task)
    assert (second.session_id, second.agent, second.input) == (first.session_id, "scribe", "second")
    assert second.id != first.id
    assert (await sdk.tasks.wait(second.id, timeout=WAIT_S)).status == "completed"
    third = await sdk.tasks.submit("third", agent="scribe", session_id=first.session_id)
    assert third.session_id == first.session_id
    await sdk.tasks.wait(third.id, timeout=WAIT_S)

    session = await sdk.sessions.get(first.session_id)
    assert isinstance(session, Session)
    assert (session.id, session.agent) == (first.session_id, "scribe")
    assert session.created_ms <= first.created_ms
    assert [t.id for t in session.tasks] == [first.id, second.id, third.id]
    assert [t.input for t in session.tasks] == ["first", "second", "third"]
    for transcript in session.tasks:
        assert transcript.status == "completed" and transcript.final_answer == FINAL_ANSWER
        assert [s.kind for s in transcript.steps] == ["action"] * TOOL_STEPS + ["final"]
        assert transcript.model_dump() == (await sdk.tasks.steps(transcript.id)).model_dump()

    # a session talks to one agent; unknown sessions are not found
    await raises(InvalidRequestError, sdk.tasks.submit("wrong agent", agent="assistant",
                                                       session_id=first.session_id))
    await raises(NotFoundError, sdk.sessions.get("sess_doesnotexist"))
    await raises(NotFoundError, sdk.sessions.send("sess_doesnotexist", "hello?"))
    await raises(NotFoundError, sdk.tasks.submit("hello?", agent="scribe", session_id="sess_doesnotexist"))
    assert len((await sdk.tasks.list()).data) == 3


def test_session_send_and_get(backend):
    backend.run(session_conversation)


async def busy_session(sdk) -> None:
    await make_scribe(sdk)
    first = await sdk.tasks.submit("first", agent="scribe")
    await raises(ConflictError, sdk.sessions.send(first.session_id, "too soon"))
    await raises(ConflictError, sdk.tasks.submit("too soon", agent="scribe", session_id=first.session_id))
    await sdk.tasks.cancel(first.id)
    assert (await sdk.tasks.wait(first.id, timeout=WAIT_S)).status == "cancelled"
    second = await sdk.sessions.send(first.session_id, "now")  # a finished task frees the session
    assert second.session_id == first.session_id
    await sdk.tasks.cancel(second.id)
    assert (await sdk.tasks.wait(second.id, timeout=WAIT_S)).status == "cancelled"
    session = await sdk.sessions.get(first.session_id)
    assert [(t.id, t.input, t.status) for t in session.tasks] == [(first.id, "first", "cancelled"),
                                                                   (second.id, "now", "cancelled")]
    assert sorted(t.id for t in (await sdk.tasks.list()).data) == sorted([first.id, second.id])


def test_busy_session_conflict(backend):
    backend.run(busy_session, model=SlowModel(0.5))


# ---- memories ---------------------------------------------------------------------------------------------
async def memories_crud(sdk) -> None:
    await make_scribe(sdk, "keeper")
    await make_scribe(sdk, "other")
    assert await sdk.memories.search("keeper", "anything at all") == []
    empty = await sdk.memories.list("keeper")
    assert isinstance(empty, MemoryPage) and empty.data == [] and empty.next_cursor is None

    sky = await sdk.memories.add("keeper", "the sky over the harbour is blue", metadata={"source": "test"})
    assert isinstance(sky, Memory)
    assert (sky.agent, sky.kind, sky.text, sky.metadata) == ("keeper", "fact", "the sky over the harbour is blue",
                                                             {"source": "test"})
    trip = await sdk.memories.add("keeper", "went sailing on tuesday", kind="episode")
    assert (trip.kind, trip.metadata) == ("episode", {})
    assert await sdk.memories.get("keeper", sky.id) == sky

    assert {m.id for m in (await sdk.memories.list("keeper")).data} == {sky.id, trip.id}
    assert [m.id for m in (await sdk.memories.list("keeper", kind="episode")).data] == [trip.id]
    assert [m.id for m in (await sdk.memories.list("keeper", kind="fact")).data] == [sky.id]
    assert (await sdk.memories.list("other")).data == []

    hits = await sdk.memories.search("keeper", "the sky over the harbour is blue", k=1)
    assert len(hits) == 1 and isinstance(hits[0], MemoryHit)
    assert hits[0].memory == sky and isinstance(hits[0].score, float)
    both = await sdk.memories.search("keeper", "sky harbour blue", k=5)
    assert {h.memory.id for h in both} == {sky.id, trip.id}
    assert [h.score for h in both] == sorted((h.score for h in both), reverse=True)
    only_episodes = await sdk.memories.search("keeper", "sky harbour blue", kinds=["episode"])
    assert [h.memory.id for h in only_episodes] == [trip.id]
    assert await sdk.memories.search("other", "the sky over the harbour is blue") == []

    grey = await sdk.memories.update("keeper", sky.id, text="the sky over the harbour is grey")
    assert (grey.id, grey.text, grey.metadata) == (sky.id, "the sky over the harbour is grey", {"source": "test"})
    assert grey.updated_ms >= sky.updated_ms and grey.created_ms == sky.created_ms
    tagged = await sdk.memories.update("keeper", sky.id, metadata={"source": "edited"})
    assert (tagged.text, tagged.metadata) == ("the sky over the harbour is grey", {"source": "edited"})
    assert await sdk.memories.get("keeper", sky.id) == tagged

    # another agent's memory answers exactly like a missing one, and is left alone
    for attempt in (sdk.memories.get("other", sky.id),
                    sdk.memories.update("other", sky.id, text="hijacked"),
                    sdk.memories.delete("other", sky.id)):
        await raises(NotFoundError, attempt)
    assert await sdk.memories.get("keeper", sky.id) == tagged

    # unknown memory ids and agents
    await raises(NotFoundError, sdk.memories.get("keeper", "no-such-memory"))
    await raises(NotFoundError, sdk.memories.get("keeper", "00000000-0000-0000-0000-000000000000"))
    await raises(NotFoundError, sdk.memories.update("keeper", "no-such-memory", text="x"))
    await raises(NotFoundError, sdk.memories.delete("keeper", "no-such-memory"))
    await raises(NotFoundError, sdk.memories.add("ghost", "boo"))
    await raises(NotFoundError, sdk.memories.list("ghost"))
    await raises(NotFoundError, sdk.memories.search("ghost", "boo"))
    await raises(NotFoundError, sdk.memories.get("ghost", sky.id))

    assert await sdk.memories.delete("keeper", sky.id) is None
    await raises(NotFoundError, sdk.memories.get("keeper", sky.id))
    await raises(NotFoundError, sdk.memories.delete("keeper", sky.id))
    assert [m.id for m in (await sdk.memories.list("keeper")).data] == [trip.id]
    assert [h.memory.id for h in await sdk.memories.search("keeper", "sky harbour blue")] == [trip.id]


def test_memories_crud_and_search(backend):
    backend.run(memories_crud)


# ---- not found --------------------------------------------------------------------------------------------
async def not_found(sdk) -> None:
    for call in (sdk.tasks.get, sdk.tasks.steps, sdk.tasks.cancel):
        await raises(NotFoundError, call("task_doesnotexist"))
    await raises(NotFoundError, sdk.tasks.wait("task_doesnotexist", timeout=5))
    await raises(NotFoundError, sdk.tasks.submit("hello", agent="ghost"))
    await raises(NotFoundError, sdk.tasks.submit("hello", agent="ghost", idempotency_key="ghostly"))
    await raises(NotFoundError, sdk.agents.get("ghost"))
    await raises(NotFoundError, sdk.agents.delete("ghost"))
    assert (await sdk.tasks.list()).data == []  # nothing was created for the unknown agent


def test_unknown_ids_are_not_found(backend):
    backend.run(not_found)


# ---- HTTP only: retries, connection failures, authentication ----------------------------------------------
class DropFirstSubmit(httpx.AsyncBaseTransport):
    """Forwards every request to the real server, but answers the first POST /v1/tasks with a dropped
    connection *after* the server handled it (so the server did create the task)."""

    def __init__(self):
        self.inner = httpx.AsyncHTTPTransport()
        self.submits: list[tuple[str | None, int]] = []  # (Idempotency-Key, status) of each POST /v1/tasks

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and request.url.path == "/v1/tasks":
            self.submits.append((request.headers.get("Idempotency-Key"), response.status_code))
            if len(self.submits) == 1:
                await response.aread()
                await response.aclose()
                raise httpx.ReadError("connection dropped before the answer arrived", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_http_submit_retried_after_dropped_connection_creates_one_task(served):
    async def scenario(base_url: str, key: str) -> None:
        transport = DropFirstSubmit()
        async with AsyncClient(base_url, key, transport=transport, backoff_base_s=0.01) as sdk:
            await make_scribe(sdk)
            task = await sdk.tasks.submit("exactly once", agent="scribe")
            assert [status for _key, status in transport.submits] == [201, 200]  # created, then found again
            assert len({key for key, _status in transport.submits}) == 1 and transport.submits[0][0]
            listed = (await sdk.tasks.list(agent="scribe")).data
            assert [(t.id, t.input) for t in listed] == [(task.id, "exactly once")]
            assert (await sdk.tasks.wait(task.id, timeout=WAIT_S)).status == "completed"
            assert len((await sdk.tasks.list()).data) == 1

    with served() as server:
        asyncio.run(scenario(server.base_url, server.api_key))


def test_http_unreachable_server_raises_connection_failed():
    async def scenario(base_url: str) -> None:
        async with AsyncClient(base_url, "any-key", max_retries=1, backoff_base_s=0.01) as sdk:
            for call in (sdk.agents.list(), sdk.tasks.submit("hello"), sdk.tasks.get("task_x"),
                         sdk.agents.create("a", "b"), collect(sdk, "task_x")):
                assert (await raises(ConnectionFailed, call)).status == 0

    asyncio.run(scenario(f"http://127.0.0.1:{free_port()}"))


def test_http_bad_key_raises_authentication_error(served):
    async def scenario(base_url: str, good_key: str) -> None:
        async with AsyncClient(base_url, "engram-not-a-real-key") as sdk:
            for call in (sdk.agents.list(), sdk.tasks.submit("hello"), sdk.tasks.list(), collect(sdk, "task_x"),
                         sdk.memories.search("assistant", "x")):
                await raises(AuthenticationError, call)
        async with AsyncClient(base_url, good_key) as sdk:
            assert (await sdk.tasks.list()).data == []  # the refused submit created nothing

    with served() as server:
        asyncio.run(scenario(server.base_url, server.api_key))


# ---- the synchronous Client (HTTP only) -------------------------------------------------------------------
def test_sync_client_end_to_end(served):
    with served() as server, Client(server.base_url, server.api_key) as client:
        agent = client.agents.create("scribe", "Record facts.", tools=TOOLS)
        assert isinstance(agent, Agent) and client.agents.get("scribe") == agent
        assert [a.name for a in client.agents.list()] == ["assistant", "scribe"]

        task = client.tasks.submit("sync", agent="scribe", idempotency_key="sync-1")
        assert client.tasks.submit("sync", agent="scribe", idempotency_key="sync-1").id == task.id
        events = list(client.tasks.events(task.id))
        assert REQUIRED_EVENT_TYPES <= {e.type for e in events} and events[-1].type == "final"
        keys = [event_key(e.id) for e in events]
        assert keys == sorted(set(keys))
        tail = list(client.tasks.events(task.id, after=events[2].id))
        assert [e.id for e in tail] == [e.id for e in events[3:] if e.type != "model_tokens"]  # live-only
        done = client.tasks.wait(task.id, timeout=WAIT_S)
        assert (done.status, done.final_answer) == ("completed", FINAL_ANSWER)
        assert len(client.tasks.steps(task.id).steps) == TOOL_STEPS + 1
        assert [t.id for t in client.tasks.list(agent="scribe").data] == [task.id]

        second = client.sessions.send(task.session_id, "more")
        client.tasks.wait(second.id, timeout=WAIT_S)
        assert [t.id for t in client.sessions.get(task.session_id).tasks] == [task.id, second.id]

        memory = client.memories.add("scribe", "a synchronous fact")
        assert client.memories.get("scribe", memory.id) == memory
        assert client.memories.search("scribe", "a synchronous fact", k=1)[0].memory.id == memory.id
        client.memories.delete("scribe", memory.id)

        for call, args in ((client.tasks.get, ("task_doesnotexist",)), (client.agents.get, ("ghost",)),
                           (client.memories.get, ("scribe", memory.id))):
            with pytest.raises(NotFoundError):
                call(*args)
        with pytest.raises(InvalidRequestError) as invalid:
            client.agents.create("broken", "x", tools=["no_such_tool"])
        assert invalid.value.field == "tools"
        with pytest.raises(ConflictError):
            client.agents.delete("assistant")


def test_sync_client_timeouts_and_errors(served):
    with served(model=SlowModel(0.3)) as server:
        with Client(server.base_url, server.api_key) as client:
            client.agents.create("scribe", "Record facts.", tools=TOOLS)
            task = client.tasks.submit("slow", agent="scribe")
            with pytest.raises(TaskTimeout):
                client.tasks.wait(task.id, timeout=0.2)
            with pytest.raises(ConflictError):
                client.sessions.send(task.session_id, "too soon")
            client.tasks.cancel(task.id)
            assert client.tasks.wait(task.id, timeout=WAIT_S).status == "cancelled"
        with Client(server.base_url, "engram-not-a-real-key") as client, pytest.raises(AuthenticationError):
            client.agents.list()
    with Client(f"http://127.0.0.1:{free_port()}", "any", max_retries=1, backoff_base_s=0.01) as client:
        with pytest.raises(ConnectionFailed):
            client.tasks.list()
