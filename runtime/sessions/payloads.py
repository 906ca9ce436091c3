"""Each payload of a session stored once: the stored form of a step, and events that refer to payloads.

A step's payloads are the model's output and its tool calls' outcomes. Where they live:
- Before the step commits, the chosen action is in the tool records (`intent:<action key>`) and each call's
  outcome in `result:<call key>`: what a resumed run needs after a crash.
- The commit writes the step log entry and deletes that step's tool records and its streamed
  `model_tokens` events in the same script: from then on the step log is the only copy.
- The stored step drops what it can derive: its id (session id + index), the parsed action when the raw
  output is exactly its JSON, and each observation's call index, tool, arguments and idempotency key
  (they come from the action). `unpack_step` gives the full `Step` back.
- `tool_call` / `tool_result` events carry a reference ({"index", "call_index", "ref"}), which
  `SessionStore.events` resolves from the tool records or, once committed, from the step log.

Deliberately not deduplicated: the retrieved memories a step shows (a copy of the memory store's text,
kept as the audit of what the model saw) and the final answer in the session state and its `final` event.
"""

from __future__ import annotations

import json
from typing import Any

from .models import Step, step_id_for

OUTCOME_KEYS = ("result", "error")
CALL_REF, OUTCOME_REF = "call", "outcome"


def action_key(session_id: str, index: int) -> str:
    """Idempotency key under which step `index`'s chosen action is recorded before it runs."""
    return f"{session_id}:{index}:action"


def call_key(session_id: str, index: int, call_index: int) -> str:
    """Idempotency key of one tool call (passed to the tool; its intent and result are recorded under it)."""
    return f"{session_id}:{index}:{call_index}"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _parses_to(text: str | None, action: dict | None) -> bool:
    if text is None or action is None:
        return False
    try:
        return _canonical(json.loads(text)) == _canonical(action)
    except ValueError:
        return False


def _calls(action: dict | None) -> list[dict]:
    calls = (action or {}).get("calls")
    return calls if isinstance(calls, list) else []


def outcome_of(observation: dict) -> dict:
    """The call's outcome: {"result": ...} or {"error": ...}."""
    return {key: observation[key] for key in OUTCOME_KEYS if key in observation}


def _is_derivable(observation: dict, position: int, calls: list[dict], session_id: str, index: int) -> bool:
    if position >= len(calls) or not isinstance(calls[position], dict):
        return False
    call = calls[position]
    expected = {"call_index": position, "tool": call.get("name"), "arguments": call.get("arguments", {}),
                "idempotency_key": call_key(session_id, index, position)}
    rest = {k: v for k, v in observation.items() if k not in OUTCOME_KEYS}
    return rest == expected and len(outcome_of(observation)) == 1


def pack_step(step: Step) -> str:
    """The step as stored in the log: compact JSON without what unpack_step can derive."""
    data = step.model_dump(exclude_defaults=True, exclude={"step_id"})
    if _parses_to(step.model_output, step.action):
        data.pop("action", None)
    calls = _calls(step.action)
    if data.get("observations"):
        data["observations"] = [
            outcome_of(o) if _is_derivable(o, i, calls, step.session_id, step.index) else o
            for i, o in enumerate(step.observations)]
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def unpack_step(raw: str, session_id: str) -> Step:
    """The full Step from its stored form (also reads entries stored whole, with their step_id)."""
    data = json.loads(raw)
    data.setdefault("step_id", step_id_for(session_id, data["index"]))
    if data.get("action") is None and data.get("kind") in ("action", "final") and data.get("model_output"):
        try:
            data["action"] = json.loads(data["model_output"])
        except ValueError:
            pass
    calls, index = _calls(data.get("action")), data["index"]
    data["observations"] = [
        {"call_index": i, "tool": calls[i].get("name"), "arguments": calls[i].get("arguments", {}),
         "idempotency_key": call_key(session_id, index, i), **o} if "tool" not in o and i < len(calls) else o
        for i, o in enumerate(data.get("observations") or [])]
    return Step.model_validate(data)


def committed_record_fields(step: Step) -> list[str]:
    """The tool-record fields that the commit of `step` makes redundant (the step log holds their payloads)."""
    sid = step.session_id
    fields = [f"intent:{action_key(sid, step.index)}"]
    for i in range(len(_calls(step.action))):
        fields += [f"intent:{call_key(sid, step.index, i)}", f"result:{call_key(sid, step.index, i)}"]
    return fields


def bounded(outcome: dict, limit: int, key: str) -> dict:
    """A call's outcome as the model (and an event reader) sees it: a result or error longer than `limit`
    characters (as JSON text) cut to `limit`, with a marker saying how much was cut and where the full one is."""
    name, value = next(iter(outcome.items()))
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) <= limit:
        return outcome
    marker = (f" [... {len(text) - limit} of {len(text)} characters cut; the full {name} is stored with the "
              f"call {key}]")
    return {name: text[:limit] + marker}


def call_event(index: int, call_index: int) -> dict:
    """Data of a `tool_call` event: a reference to the call in the step's action."""
    return {"index": index, "call_index": call_index, "ref": CALL_REF}


def outcome_event(index: int, call_index: int, limit: int) -> dict:
    """Data of a `tool_result` event: a reference to the call's outcome, shown cut to `limit` characters."""
    return {"index": index, "call_index": call_index, "ref": OUTCOME_REF, "limit": limit}


def resolve_event(data: dict, session_id: str, action: dict | None, outcomes: dict[int, dict],
                  step: Step | None) -> dict:
    """An event's data with its reference replaced by the payload: from the step's recorded action / call
    outcomes (before the commit) or its committed `step` (after). {"unavailable": true} if neither has it."""
    index, call_index = data["index"], data["call_index"]
    base = {"index": index, "call_index": call_index}
    if step is not None:
        action = step.action
        if call_index < len(step.observations):
            outcomes = {call_index: outcome_of(step.observations[call_index])}
    if data["ref"] == CALL_REF:
        calls = _calls(action)
        if call_index < len(calls):
            return {**base, "tool": calls[call_index].get("name"), "arguments": calls[call_index].get("arguments", {})}
    elif call_index in outcomes and outcomes[call_index]:
        return {**base, **bounded(outcomes[call_index], int(data.get("limit", 8000)),
                                  call_key(session_id, index, call_index))}
    return {**base, "unavailable": True}
