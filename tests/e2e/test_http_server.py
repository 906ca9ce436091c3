"""The real HTTP server end to end: `python -m runtime.cli serve` in a subprocess on 127.0.0.1, over the shared
Redis, running a tiny RANDOM checkpoint. A random model's task ends `completed` or `failed` (unparseable output
or the step limit): both are terminal outcomes, and every test here only requires a terminal one.

Event streams are read with raw httpx and a strict SSE parser (every event must carry `id:`, `event:` and one
`data:` line), so what is checked is the wire format, not the SDK's tolerance of it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import pytest

from runtime.sdk import Client
from runtime.sessions import SessionStore
from tests.e2e.conftest import Server, base_env, cli, free_port

TERMINAL_EVENTS = {"final": "completed", "error": "failed"}
TERMINAL_STATUSES = ("completed", "failed")
TOOLS = ["calculator", "memory_write", "memory_search"]
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)  # the server sends a keep-alive comment every 15 s


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    data: dict

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def stream_key(event_id: str) -> tuple[int, int]:
    """A Redis stream id 'ms-seq' as a sortable pair (the API's event ids are stream ids)."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def assert_strictly_increasing(ids: list[str]) -> None:
    keys = [stream_key(i) for i in ids]
    bad = [(a, b) for a, b in zip(ids, ids[1:]) if stream_key(b) <= stream_key(a)]
    assert not bad and keys == sorted(set(keys)), f"event ids not strictly increasing: {bad[:5]}"


def read_events(server: Server, task_id: str, *, last_event_id: str | None = None,
                stop_after: int | None = None, stop_when=None) -> list[Event]:
    """Read `GET /v1/tasks/{id}/events` on a connection of its own: up to the terminal event, or until
    `stop_after` events were read / `stop_when(event)` is true, then close the client, which drops the TCP
    connection mid-stream."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    events: list[Event] = []
    with httpx.Client(base_url=server.url, timeout=STREAM_TIMEOUT) as http:
        with http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as response:
            if response.status_code != 200:
                response.read()
                raise AssertionError(f"events of {task_id}: {response.status_code} {response.text[:1000]}")
            assert response.headers["content-type"].startswith("text/event-stream"), response.headers
            fields: dict[str, list[str]] = {}
            for line in response.iter_lines():
                if line.startswith(":"):
                    continue  # keep-alive comment
                if line:
                    name, _, value = line.partition(":")
                    fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
                    continue
                if not fields:
                    continue
                assert len(fields.get("id", [])) == 1, f"an event without exactly one id: line: {fields}"
                assert len(fields.get("event", [])) == 1 and len(fields.get("data", [])) == 1, fields
                event = Event(fields["id"][0], fields["event"][0], json.loads(fields["data"][0]))
                fields = {}
                events.append(event)
                if event.terminal or (stop_after is not None and len(events) >= stop_after) or (
                        stop_when is not None and stop_when(event)):
                    return events
    return events  # the server ended the stream without a terminal event (asserted on by the callers)


def auth(server: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}"}


def create_agent(http: httpx.Client, name: str, *, max_steps: int, max_tokens_per_step: int) -> dict:
    response = http.post("/v1/agents", json={
        "name": name, "instructions": "You are a careful assistant. Use the tools, then answer briefly.",
        "tools": TOOLS, "limits": {"max_steps": max_steps, "max_tokens_per_step": max_tokens_per_step}})
    assert response.status_code == 201, response.text
    return response.json()


def submit(http: httpx.Client, agent: str, text: str) -> dict:
    response = http.post("/v1/tasks", json={"agent": agent, "input": text})
    assert response.status_code == 201, response.text
    task = response.json()
    assert response.headers["Location"] == f"/v1/tasks/{task['id']}"
    assert task["status"] in ("pending", "running") and task["agent"] == agent, task
    return task


def assert_gap_free(transcript) -> None:
    """A finished task's step log: indexes exactly 0..n-1, as many as step_count, the last one terminal."""
    indexes = [step.index for step in transcript.steps]
    assert indexes == list(range(transcript.step_count)), (transcript.id, indexes, transcript.step_count)
    assert transcript.steps and transcript.steps[-1].kind in ("final", "error"), transcript.steps[-1:]
    assert all(step.kind in ("action", "summary") for step in transcript.steps[:-1]), transcript.id


def committed_indexes(events: list[Event]) -> list[int]:
    return [e.data["index"] for e in events if e.type == "step_committed"]


# ---- 1. SSE reconnect with Last-Event-ID, then a second message in the session ---------------------------
def test_task_events_reconnect_and_second_message(engram_server):
    server = engram_server
    with httpx.Client(base_url=server.url, headers=auth(server), timeout=30.0) as http, \
            Client(server.url, server.api_key) as client:
        create_agent(http, "helper", max_steps=4, max_tokens_per_step=64)
        task = submit(http, "helper", "What is 6 times 7?")
        task_id, session_id = task["id"], task["session_id"]

        first = read_events(server, task_id, stop_after=3)  # then the connection is dropped mid-stream
        assert len(first) == 3 and not any(e.terminal for e in first), first
        assert first[0].type == "step_started" and first[0].data == {"index": 0}, first[0]
        rest = read_events(server, task_id, last_event_id=first[-1].id)
        assert rest and rest[-1].terminal, f"the resumed stream ended without final/error: {rest[-3:]}"
        full = read_events(server, task_id)  # a fresh read of the whole stream, from the start
        assert full and full[-1].terminal, full[-3:]

        # streamed tokens are live-only (a step's commit drops them), so a later read has every other event
        resumed_ids = [e.id for e in first + rest if e.type != "model_tokens"]
        full_ids = [e.id for e in full]
        assert resumed_ids == full_ids, (  # nothing lost, nothing repeated across the reconnect
            f"reconnect lost {sorted(set(full_ids) - set(resumed_ids))[:5]}, "
            f"repeated {[i for i in resumed_ids if resumed_ids.count(i) > 1][:5]}")
        assert_strictly_increasing(full_ids)
        assert [e.terminal for e in full].count(True) == 1, "exactly one terminal event, the last one"
        assert [e.type for e in first + rest if e.type != "model_tokens"] == [e.type for e in full]

        result = http.get(f"/v1/tasks/{task_id}")
        assert result.status_code == 200, result.text
        done = result.json()
        assert done["status"] == TERMINAL_EVENTS[full[-1].type], (done, full[-1])
        assert done["step_count"] == len(committed_indexes(full)) >= 1, (done, committed_indexes(full))
        assert committed_indexes(full) == list(range(done["step_count"]))
        if done["status"] == "failed":
            assert done["error"] and full[-1].data.get("error") == done["error"], (done, full[-1])
        else:
            assert done["final_answer"] is not None and full[-1].data.get("answer") == done["final_answer"]

        # continue the conversation with a second message: a new task of the same agent in the same session
        response = http.post(f"/v1/sessions/{session_id}/messages", json={"input": "And what is 2 plus 2?"})
        assert response.status_code == 201, response.text
        second = response.json()
        assert second["session_id"] == session_id and second["agent"] == "helper" and second["id"] != task_id
        finished = client.tasks.wait(second["id"], timeout=120)
        assert finished.status in TERMINAL_STATUSES, finished

        session = client.sessions.get(session_id)  # GET /v1/sessions/{session_id}
        assert session.id == session_id and session.agent == "helper"
        assert [t.id for t in session.tasks] == [task_id, second["id"]], [t.id for t in session.tasks]
        assert [t.input for t in session.tasks] == ["What is 6 times 7?", "And what is 2 plus 2?"]
        assert session.tasks[0].status == done["status"] and session.tasks[0].step_count == done["step_count"]
        assert session.tasks[1].status == finished.status
        for transcript in session.tasks:
            assert transcript.status in TERMINAL_STATUSES
            assert_gap_free(transcript)


# ---- 2. SIGKILL mid-task; the restarted server resumes and finishes the task ------------------------------
KILL_INPUTS = ("Add 2 and 2.", "Compute 12*12 then 3+4", "Remember that I like tea.", "What is 6 times 7?")


def _task_state(redis_url: str, key_prefix: str, task_id: str):
    async def read():
        store = SessionStore(redis_url, key_prefix=key_prefix)
        try:
            return await store.state(task_id)
        finally:
            await store.close()

    return asyncio.run(read())


def test_sigkill_mid_task_then_restart_completes(engram_server, redis_url, key_prefix):
    server = engram_server
    with httpx.Client(base_url=server.url, headers=auth(server), timeout=30.0) as http:
        create_agent(http, "worker", max_steps=6, max_tokens_per_step=160)
        # A random model may fail in its very first step (unparseable output); the kill must land after a
        # committed non-final step, so try a few inputs until one commits an action step first.
        for text in KILL_INPUTS:
            task = submit(http, "worker", text)
            before = read_events(server, task["id"],
                                 stop_when=lambda e: e.type == "step_committed" and e.data.get("kind") == "action")
            if before and not before[-1].terminal:
                break
            assert before and before[-1].terminal, before[-3:]  # that task simply ended: try the next input
        else:
            pytest.fail(f"none of {KILL_INPUTS} committed an action step before ending")
    task_id = task["id"]
    killed_after = before[-1]
    assert killed_after.type == "step_committed" and killed_after.data["kind"] == "action", killed_after

    server.kill()  # SIGKILL right after the commit: the next step is mid-generation (or about to start)

    state = _task_state(redis_url, key_prefix, task_id)
    assert not state.finished, f"the kill did not land mid-task: {state.status}"  # else the test proves nothing
    assert state.step_count == killed_after.data["index"] + 1, (state.step_count, killed_after)

    server.start()  # same env and port; asserts that no new API key is printed
    with Client(server.url, server.api_key) as client:
        finished = client.tasks.wait(task_id, timeout=150)  # the runner resumes it once the 2 s lease expired
        assert finished.status in TERMINAL_STATUSES, finished
        transcript = client.tasks.steps(task_id)  # GET /v1/tasks/{id}/steps
    assert_gap_free(transcript)
    assert transcript.step_count > killed_after.data["index"] + 1, "no step was run after the restart"

    resumed = read_events(server, task_id, last_event_id=killed_after.id)
    assert resumed and resumed[-1].terminal, f"the resumed stream ended without final/error: {resumed[-3:]}"
    assert all(stream_key(e.id) > stream_key(killed_after.id) for e in resumed), "an event at/before Last-Event-ID"
    assert_strictly_increasing([e.id for e in resumed])
    assert TERMINAL_EVENTS[resumed[-1].type] == transcript.status
    # every step after the kill point was committed exactly once, in order
    assert committed_indexes(resumed) == list(range(killed_after.data["index"] + 1, transcript.step_count))
    full = read_events(server, task_id)
    assert committed_indexes(full) == list(range(transcript.step_count)), committed_indexes(full)
    assert [e.id for e in full if stream_key(e.id) > stream_key(killed_after.id)] == [e.id for e in resumed]


# ---- 3. the CLI against the server ----------------------------------------------------------------------
def _one_error_line(result) -> str:
    assert result.returncode != 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_cli_against_server(engram_server):
    server = engram_server
    with Client(server.url, server.api_key) as client:
        client.agents.create("helper", "You help.", tools=TOOLS, limits={"max_steps": 2, "max_tokens_per_step": 48})
        task = client.tasks.submit("What is 6 times 7?", agent="helper")
        client.tasks.wait(task.id, timeout=120)  # so the model leaves the 2 CPUs to the CLI processes
    env = server.cli_env()

    listed = cli("tasks", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    assert task.id in listed.stdout, listed.stdout

    _one_error_line(cli("tasks", "show", "task_does_not_exist", env=env))

    closed = f"http://127.0.0.1:{free_port()}"
    line = _one_error_line(cli("tasks", "list", "--url", closed, env=env))  # ENGRAM_URL (the live server) set
    assert closed in line, line

    added = cli("memories", "add", "helper", "the sky is blue", env=env)
    assert added.returncode == 0 and added.stdout.startswith("added "), (added.stdout, added.stderr)
    found = cli("memories", "search", "helper", "sky", env=env)
    assert found.returncode == 0, found.stderr
    assert "the sky is blue" in found.stdout, found.stdout
    line = _one_error_line(cli("memories", "add", "helper", "x", "--metadata", "{bad", env=env))
    assert line.startswith("error: --metadata: not JSON"), line

    cancelled = cli("tasks", "cancel", task.id, env=env)  # it finished above
    assert cancelled.returncode == 0 and cancelled.stdout.strip().endswith("nothing to cancel"), cancelled.stdout
    logs = cli("tasks", "logs", task.id, env=env)  # without -f: the events so far, here to the end
    ending = ("final answer: ", "  ended ")  # its final or error event
    assert logs.returncode == 0 and any(e in logs.stdout for e in ending) and logs.stderr == "", (logs.stdout,
                                                                                                  logs.stderr)


def test_cli_group_level_url_option_is_honoured():
    env = {**base_env(), "ENGRAM_URL": f"http://127.0.0.1:{free_port()}", "ENGRAM_API_KEY": "engram_x_y"}
    wanted = f"http://127.0.0.1:{free_port()}"
    line = _one_error_line(cli("tasks", "--url", wanted, "list", env=env))
    assert wanted in line, line  # the option before the subcommand wins over $ENGRAM_URL


# ---- 4. `resume` of an unknown id answers from Redis alone ---------------------------------------------
def test_resume_unknown_answers_before_loading_a_model(tmp_path, redis_url, key_prefix):
    missing_model = tmp_path / "no-such-model"
    env = {**base_env(), "ENGRAM_DATA_DIR": str(tmp_path / "data"), "ENGRAM_REDIS_URL": redis_url,
           "ENGRAM_KEY_PREFIX": key_prefix, "ENGRAM_EMBEDDER": "hashing", "ENGRAM_MODEL_PATH": str(missing_model)}
    started = time.monotonic()
    result = cli("resume", "no-such-id", env=env)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.stderr.splitlines() == ["error: no task or session 'no-such-id'"], result.stderr
    assert result.stdout == "", result.stdout  # nothing was started (no "resuming", no runtime start-up)
    assert elapsed < 20, f"took {elapsed:.1f}s"
    assert not missing_model.exists()
