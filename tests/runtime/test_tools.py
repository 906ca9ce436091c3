"""Tools: the registry validates and runs calls, function registration builds the JSON schema a hand-written
reference expects and passes each call its idempotency key, and the built-ins behave as documented; the memory
tools are run against the real memory store (SQLite in tmp) and write exactly once per key."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from typing import Annotated, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from runtime.tools import (
    BUILTIN_TOOL_NAMES,
    CurrentTime,
    FunctionTool,
    ToolArgumentError,
    ToolContext,
    ToolError,
    ToolRegistry,
    UnknownToolError,
    bound_schema,
    builtin_tools,
    idempotency_key_for,
    parameters_schema,
)


def ctx_for(step: int = 0, call: int = 0, *, tenant: str = "acme", agent: str = "helper", session: str = "s1",
            memory=None) -> ToolContext:
    return ToolContext(tenant=tenant, agent=agent, session_id=session, step_index=step, call_index=call,
                       memory=memory)


def run(coro):
    return asyncio.run(coro)


# --- function registration ------------------------------------------------------------------------


class Place(BaseModel):
    city: str
    country: str | None = None


def forecast(place: Place, days: Annotated[int, Field(ge=1, le=7, description="how many days")] = 3,
             units: Literal["c", "f"] = "c", tags: list[str] | None = None, *, ctx: ToolContext) -> dict:
    """Weather forecast for a place.

    Longer text that is not part of the description.
    """
    return {"city": place.city, "days": days, "units": units, "key": ctx.idempotency_key}


FORECAST_PARAMETERS = {  # written by hand from the signature above
    "type": "object",
    "properties": {
        "place": {"type": "object",
                  "properties": {"city": {"type": "string"},
                                 "country": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}},
                  "required": ["city"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7, "default": 3, "description": "how many days"},
        "units": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}], "default": None},
    },
    "required": ["place"],
    "additionalProperties": False,
}


def test_function_registration_builds_the_schema_from_type_hints():
    registry = ToolRegistry()
    registry.register_function(forecast)
    schema = registry.get("forecast").json_schema()
    assert schema == {"name": "forecast", "description": "Weather forecast for a place.",
                      "parameters": FORECAST_PARAMETERS}
    jsonschema.Draft202012Validator.check_schema(schema["parameters"])


def test_function_tools_receive_the_idempotency_key_and_context():
    seen: dict[str, object] = {}

    def book(title: str, idempotency_key: str) -> str:
        """Book a thing."""
        seen["sync_thread"] = threading.get_ident()
        return f"booked {title} as {idempotency_key}"

    async def note(text: str, context: ToolContext) -> dict:
        """Take a note."""
        seen["async_thread"] = threading.get_ident()
        return {"tenant": context.tenant, "key": context.idempotency_key}

    registry = ToolRegistry()
    for fn in (book, note, forecast):
        registry.register_function(fn)
    ctx = ctx_for(step=4, call=2, session="sess-9")
    assert ctx.idempotency_key == "sess-9:4:2" == idempotency_key_for("sess-9", 4, 2)
    loop_thread: list[int] = []

    async def calls():
        loop_thread.append(threading.get_ident())
        return (await registry.call("book", {"title": "x"}, ctx), await registry.call("note", {"text": "n"}, ctx),
                await registry.call("forecast", {"place": {"city": "Paris"}}, ctx))

    booked, noted, forecasted = run(calls())
    assert booked == {"result": "booked x as sess-9:4:2"}  # non-dict results are wrapped
    assert noted == {"tenant": "acme", "key": "sess-9:4:2"}
    assert forecasted == {"city": "Paris", "days": 3, "units": "c", "key": "sess-9:4:2"}
    assert seen["async_thread"] == loop_thread[0] != seen["sync_thread"]  # sync tools never block the loop
    # injected parameters are not part of the schema the model sees
    assert set(registry.get("book").json_schema()["parameters"]["properties"]) == {"title"}
    assert set(registry.get("note").json_schema()["parameters"]["properties"]) == {"text"}


def test_explicit_idempotency_key_in_the_context_wins():
    ctx = ToolContext(tenant="t", agent="a", session_id="s", step_index=1, call_index=0, idempotency_key="custom")
    assert ctx.idempotency_key == "custom"


@pytest.mark.parametrize(("fn", "error", "message"), [
    (lambda x: x, ValueError, "name must match"),
    (lambda *args: 1, ValueError, "name must match"),
])
def test_unnamed_callables_need_a_name(fn, error, message):
    with pytest.raises(error, match=message):
        FunctionTool(fn, description="d")


def _no_hint(x, y: int) -> int:
    """Doc."""
    return y


def _var_args(*values: int) -> int:
    """Doc."""
    return 0


def _no_doc(x: int) -> int:
    return x


def _bad_ctx(x: int, ctx: int) -> int:
    """Doc."""
    return x


def _bad_key(x: int, idempotency_key: int) -> int:
    """Doc."""
    return x


def _unresolvable(x: NoSuchType) -> int:  # noqa: F821
    """Doc."""
    return 0


@pytest.mark.parametrize(("fn", "error", "message"), [
    (_no_hint, TypeError, "parameter 'x' of tool '_no_hint' needs a type hint"),
    (_var_args, TypeError, r"cannot take \*args"),
    (_no_doc, ValueError, "needs a description"),
    (_bad_ctx, TypeError, "'ctx' is reserved for the ToolContext"),
    (_bad_key, TypeError, "must be a str"),
    (_unresolvable, TypeError, "could not resolve the type hints.*NoSuchType"),
    ("not callable", TypeError, "fn must be callable"),
])
def test_bad_functions_are_refused_at_registration(fn, error, message):
    with pytest.raises(error, match=message):
        ToolRegistry().register_function(fn)


class Node(BaseModel):
    value: int
    children: list[Node] = []


class Reply(BaseModel):
    when: datetime


def test_recursive_argument_types_are_refused_at_registration():
    def walk(root: Node) -> int:
        """Walk a tree."""
        return root.value

    with pytest.raises(ValueError, match="recursive type 'Node'"):
        ToolRegistry().register_function(walk)


def test_duplicate_and_unknown_names():
    registry = ToolRegistry(builtin_tools())
    with pytest.raises(ValueError, match="'calculator' is already registered"):
        registry.register(builtin_tools()[3])
    with pytest.raises(UnknownToolError, match="unknown tool 'nope'.*calculator") as info:
        registry.get("nope")
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownToolError):
        registry.schemas(["calculator", "nope"])
    assert registry.names() == list(BUILTIN_TOOL_NAMES)
    assert [s["name"] for s in registry.schemas(["current_time", "calculator"])] == ["current_time", "calculator"]


# --- calls ---------------------------------------------------------------------------------------


def test_argument_errors_name_the_fields():
    registry = ToolRegistry()
    registry.register_function(forecast)
    with pytest.raises(ToolArgumentError) as info:
        run(registry.call("forecast", {"place": {}, "days": 9, "extra": 1}, ctx_for()))
    assert info.value.fields == ["place.city", "days", "extra"]
    assert "tool 'forecast': invalid arguments: place.city: Field required" in str(info.value)
    with pytest.raises(ToolArgumentError, match="arguments must be a JSON object"):
        run(registry.call("forecast", ["Paris"], ctx_for()))


def test_tool_failures_become_tool_errors_and_results_must_be_json():
    def broken(x: int) -> int:
        """Always fails."""
        raise RuntimeError(f"boom {x}")

    def not_json(x: int) -> dict:
        """Returns something JSON cannot hold."""
        return {"value": object()}

    def nan(x: int) -> float:
        """Returns NaN."""
        return float("nan")

    def model_result(x: int) -> Reply:
        """Returns a pydantic model."""
        return Reply(when=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))

    registry = ToolRegistry()
    for fn in (broken, not_json, nan, model_result):
        registry.register_function(fn)
    with pytest.raises(ToolError, match="tool 'broken': failed with RuntimeError: boom 7") as info:
        run(registry.call("broken", {"x": 7}, ctx_for()))
    assert isinstance(info.value.__cause__, RuntimeError)
    for name in ("not_json", "nan"):
        with pytest.raises(ToolError, match=f"tool '{name}': returned a result that is not JSON-serialisable"):
            run(registry.call(name, {"x": 1}, ctx_for()))
    assert run(registry.call("model_result", {"x": 1}, ctx_for())) == {"when": "2024-01-02T03:04:05Z"}


# --- schemas -------------------------------------------------------------------------------------


def test_parameters_schema_inlines_refs_and_keeps_data_and_property_names():
    class Inner(BaseModel):
        title: str = Field(description="a property that happens to be called title")

    class Outer(BaseModel):
        first: Inner
        second: list[Inner] = Field(default_factory=list)
        options: dict = Field(default={"title": "kept"})

    schema = parameters_schema(Outer)
    inner = {"type": "object", "properties": {"title": {"type": "string", "description":
                                                         "a property that happens to be called title"}},
             "required": ["title"]}
    assert schema["properties"]["first"] == inner
    assert schema["properties"]["second"]["items"] == inner
    assert schema["properties"]["options"]["default"] == {"title": "kept"}
    assert "$defs" not in schema and "title" not in schema
    # the inlined schema accepts and rejects what pydantic does
    validator = jsonschema.Draft202012Validator(schema)
    for value, ok in [({"first": {"title": "x"}}, True), ({"first": {}}, False),
                      ({"first": {"title": "x"}, "second": [{"title": 1}]}, False)]:
        assert validator.is_valid(value) is ok


def test_bound_schema_caps_strings_and_collections_without_going_below_minimums():
    schema = {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "string", "maxLength": 3}, "c": {"type": "string", "minLength": 20},
        "d": {"type": "array", "items": {"type": "string"}}, "e": {"type": "object", "additionalProperties": True},
        "f": {"type": ["string", "null"]}, "g": {"type": "string", "default": "x" * 50}},
        "additionalProperties": False}
    bounded = bound_schema(schema, max_string_chars=10, max_items=4)
    props = bounded["properties"]
    assert props["a"]["maxLength"] == 10 and props["b"]["maxLength"] == 3 and props["c"]["maxLength"] == 20
    assert props["d"]["maxItems"] == 4 and props["d"]["items"]["maxLength"] == 10
    assert props["e"]["maxProperties"] == 4 and props["e"]["propertyNames"] == {"maxLength": 10}
    assert props["f"]["maxLength"] == 10 and props["g"]["default"] == "x" * 50
    assert "maxProperties" not in bounded  # a closed object keeps its shape
    with pytest.raises(ValueError, match="max_items must be a positive int"):
        bound_schema(schema, max_items=0)


# --- current_time --------------------------------------------------------------------------------


def test_current_time_in_utc_and_in_iana_zones():
    fixed = datetime(2024, 7, 1, 12, 0, 0, tzinfo=UTC)
    registry = ToolRegistry([CurrentTime(lambda: fixed)])
    assert run(registry.call("current_time", {}, ctx_for())) == {"utc": "2024-07-01T12:00:00+00:00",
                                                                 "unix": 1719835200}
    paris = run(registry.call("current_time", {"timezone": "Europe/Paris"}, ctx_for()))
    assert paris["local"] == "2024-07-01T14:00:00+02:00" and paris["timezone"] == "Europe/Paris"  # CEST
    new_york = run(registry.call("current_time", {"timezone": "America/New_York"}, ctx_for()))
    assert new_york["local"] == "2024-07-01T08:00:00-04:00"  # EDT
    with pytest.raises(ToolArgumentError, match="unknown IANA time zone 'Mars/Olympus'") as info:
        run(registry.call("current_time", {"timezone": "Mars/Olympus"}, ctx_for()))
    assert info.value.fields == ["timezone"]


def test_current_time_reads_the_system_clock_by_default():
    before = datetime.now(UTC).replace(microsecond=0)
    result = run(ToolRegistry(builtin_tools()).call("current_time", {}, ctx_for()))
    after = datetime.now(UTC)
    assert before <= datetime.fromisoformat(result["utc"]) <= after


# --- memory tools against the real store ---------------------------------------------------------


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    from memory_service.agent_memory import AgentMemoryStore, HashingEmbedder
    from memory_service.service import MemoryService

    path = tmp_path_factory.mktemp("agent_memory") / "memory.db"
    service = MemoryService(AgentMemoryStore(f"sqlite:///{path}", HashingEmbedder(dim=64)), threads=2)
    yield service
    service.close()


def _rows(memory, tenant: str, agent: str):
    return memory.agent_memory.list(tenant, agent, limit=100).items


def test_memory_write_happens_exactly_once_per_idempotency_key(memory):
    registry = ToolRegistry(builtin_tools())
    first = ctx_for(step=3, call=1, tenant="t-once", memory=memory)
    written = run(registry.call("memory_write", {"text": "The user's favourite colour is deep blue."}, first))
    again = run(registry.call("memory_write", {"text": "The user's favourite colour is deep blue."}, first))
    assert again == written  # a re-run after a crash returns the memory of the first run

    async def concurrent_retries():
        return await asyncio.gather(*(registry.call("memory_write", {"text": "Meeting moved to Thursday."},
                                                    ctx_for(step=4, call=0, tenant="t-once", memory=memory))
                                      for _ in range(6)))

    retries = run(concurrent_retries())
    assert len({r["id"] for r in retries}) == 1
    rows = _rows(memory, "t-once", "helper")
    assert sorted(r.idempotency_key for r in rows) == ["s1:3:1", "s1:4:0"]
    by_key = {r.idempotency_key: r for r in rows}
    assert by_key["s1:3:1"].id == written["id"] and by_key["s1:3:1"].kind == "fact"
    assert (by_key["s1:3:1"].source_session, by_key["s1:3:1"].source_step) == ("s1", 3)
    # another call index is another effect
    run(registry.call("memory_write", {"text": "Meeting moved to Thursday.", "kind": "episode"},
                      ctx_for(step=4, call=1, tenant="t-once", memory=memory)))
    assert len(_rows(memory, "t-once", "helper")) == 3


def test_memory_search_is_scoped_to_the_agent_and_filters_kinds(memory):
    registry = ToolRegistry(builtin_tools())
    texts = ["the budget for the trip is 900 euros", "the cat is called Miso", "we met the client on Monday"]
    for i, text in enumerate(texts):
        run(registry.call("memory_write", {"text": text, "kind": "episode" if i == 2 else "fact"},
                          ctx_for(step=i, tenant="t-search", memory=memory)))
    run(registry.call("memory_write", {"text": "the budget of another agent"},
                      ctx_for(tenant="t-search", agent="other", session="s2", memory=memory)))
    found = run(registry.call("memory_search", {"query": "budget for the trip", "k": 5},
                              ctx_for(tenant="t-search", memory=memory)))
    hits = found["hits"]
    assert {h["text"] for h in hits} == set(texts)  # not the other agent's memory
    assert hits[0]["text"] == texts[0]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    episodes = run(registry.call("memory_search", {"query": "client", "kinds": ["episode"]},
                                 ctx_for(tenant="t-search", memory=memory)))["hits"]
    assert [h["text"] for h in episodes] == [texts[2]]
    with pytest.raises(ToolArgumentError) as info:
        run(registry.call("memory_search", {"query": "x", "k": 0}, ctx_for(tenant="t-search", memory=memory)))
    assert info.value.fields == ["k"]


def test_memory_forget_deletes_once_and_only_the_agents_own_memories(memory):
    from memory_service.agent_memory import MemoryNotFound

    registry = ToolRegistry(builtin_tools())
    mine = run(registry.call("memory_write", {"text": "an outdated fact"}, ctx_for(tenant="t-forget", memory=memory)))
    theirs = run(registry.call("memory_write", {"text": "someone else's fact"},
                               ctx_for(tenant="t-forget", agent="other", session="s2", memory=memory)))
    forget = ctx_for(step=1, tenant="t-forget", memory=memory)
    assert run(registry.call("memory_forget", {"memory_id": mine["id"]}, forget)) == {"memory_id": mine["id"],
                                                                                      "deleted": True}
    with pytest.raises(MemoryNotFound):
        memory.agent_memory.get("t-forget", mine["id"])
    assert run(registry.call("memory_forget", {"memory_id": mine["id"]}, forget))["deleted"] is False  # re-run
    with pytest.raises(ToolError, match="belongs to another agent"):
        run(registry.call("memory_forget", {"memory_id": theirs["id"]}, forget))
    other_tenant = ctx_for(tenant="t-forget-2", agent="other", memory=memory)
    assert run(registry.call("memory_forget", {"memory_id": theirs["id"]}, other_tenant))["deleted"] is False
    assert memory.agent_memory.get("t-forget", theirs["id"]).text == "someone else's fact"  # untouched


def test_memory_tools_without_a_memory_service_fail_clearly():
    registry = ToolRegistry(builtin_tools())
    for name, args in [("memory_write", {"text": "x"}), ("memory_search", {"query": "x"}),
                       ("memory_forget", {"memory_id": "m"})]:
        with pytest.raises(ToolError, match=f"tool '{name}': no memory service is configured"):
            run(registry.call(name, args, ctx_for()))


def test_memory_write_refuses_summary_kind_and_oversize_text():
    registry = ToolRegistry(builtin_tools())
    with pytest.raises(ToolArgumentError) as info:
        run(registry.call("memory_write", {"text": "x" * 8001, "kind": "summary"}, ctx_for()))
    assert info.value.fields == ["text", "kind"]


@pytest.mark.parametrize(("field", "value"), [("tenant", ""), ("step_index", -1), ("call_index", True),
                                              ("session_id", None)])
def test_tool_context_rejects_bad_values(field, value):
    fields = {"tenant": "t", "agent": "a", "session_id": "s", "step_index": 0, "call_index": 0, field: value}
    with pytest.raises(ValueError, match=field):
        ToolContext(**fields)
