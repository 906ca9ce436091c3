"""Property-based tests of the whole HTTP surface with Schemathesis: every operation of the schema the app
serves (GET /openapi.json) is called with generated valid and invalid requests, with an admin key, and
every response must be no 5xx, carry a documented status code and content type, and match the documented
schema (error responses included).

Two servers: the runtime with a scripted model (no model worker, so the OpenAI routes answer 503 by
design there) for the runtime's routes, and the shared real-worker server for the OpenAI routes."""

from __future__ import annotations

import time

import httpx
import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.runtime.api.conftest import bearer
from tests.runtime.api.support import QuickModel, endpoints

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPENAI_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models"}
MAX_EXAMPLES = 20


def test_schemathesis_and_hypothesis_are_installed():
    assert int(schemathesis.__version__.split(".")[0]) >= 4, schemathesis.__version__
    assert hypothesis.__version__


def _fuzz(operation, base_url: str, key: str, mode: GenerationMode, failures: dict, *,
          path_parameters: dict[str, str] | None = None, max_examples: int = MAX_EXAMPLES) -> dict[int, int]:
    """Run `max_examples` generated cases; the first failure of each kind per operation goes to `failures`."""
    statuses: dict[int, int] = {}
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @given(case=strategy)
    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def run(case):
        response = case.call(base_url=base_url, headers=bearer(key), timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert "Traceback" not in response.text
        try:
            case.validate_response(response, checks=CHECKS)
        except (AssertionError, schemathesis.errors.SchemathesisError, BaseExceptionGroup) as exc:
            kind = (operation.label, mode.value, response.status_code, type(exc).__name__)
            failures.setdefault(kind, str(exc))  # the text names the check and has a curl command

    try:
        run()
    except Unsatisfiable:  # e.g. no invalid request exists for an operation without parameters
        assert mode is GenerationMode.NEGATIVE, operation.label
    return statuses


def _report(failures: dict) -> str:
    return "\n\n".join(f"{' '.join(map(str, kind))}:\n{text}" for kind, text in sorted(failures.items()))


def _real_ids(base_url: str, key: str) -> dict[str, str]:
    """An agent with a memory, and a finished task with its session, of the fuzzing key's tenant."""
    with httpx.Client(base_url=base_url, headers=bearer(key), timeout=30) as c:
        if c.get("/v1/agents/fuzz-agent").status_code == 404:
            r = c.post("/v1/agents", json={"name": "fuzz-agent", "instructions": "Answer.",
                                           "tools": ["calculator", "memory_write"]})
            assert r.status_code == 201, r.text
        memories = c.get("/v1/agents/fuzz-agent/memories").json()["data"]
        memory_id = memories[0]["id"] if memories else c.post(
            "/v1/agents/fuzz-agent/memories", json={"text": "a fact to fuzz"}).json()["id"]
        task = c.post("/v1/tasks", json={"agent": "fuzz-agent", "input": "fuzz me"}).json()
        for _ in range(200):  # finished, so its event stream ends at once
            if c.get(f"/v1/tasks/{task['id']}").json()["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
    return {"name": "fuzz-agent", "agent": "fuzz-agent", "memory_id": memory_id, "task_id": task["id"],
            "session_id": task["session_id"]}


def test_runtime_routes_conform_to_the_served_schema(serve_api):
    with serve_api(model=QuickModel()) as server:
        admin = server.key("fuzz-tenant", admin=True)
        schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        documented = {(op.method.upper(), op.path) for op in operations}
        routed = {(e.method, e.path) for e in endpoints(server.app, prefix="/")}
        assert routed == documented, "every route is in the served schema"

        failures: dict = {}
        exercised = {}
        for operation in operations:
            if operation.path in OPENAI_PATHS:
                continue  # no model worker on this server: see test_openai_routes_conform_to_the_served_schema
            label = operation.label
            exercised[label] = _fuzz(operation, server.base_url, admin, GenerationMode.POSITIVE, failures)
            _fuzz(operation, server.base_url, admin, GenerationMode.NEGATIVE, failures)
            params = {p.name for p in operation.path_parameters}
            if params and "key_id" not in params:  # the real key id would be our own admin key: random ids only
                ids = _real_ids(server.base_url, admin)
                real = _fuzz(operation, server.base_url, admin, GenerationMode.POSITIVE, failures,
                             path_parameters={name: ids[name] for name in params})
                exercised[f"{label} (real ids)"] = real
        assert not failures, _report(failures)
        # the fuzzing reached past the 404s: real resources answered 2xx on the routes that read them
        for label in ("GET /v1/agents/{name} (real ids)", "GET /v1/tasks/{task_id}/events (real ids)",
                      "POST /v1/agents/{agent}/memories/search (real ids)",
                      "GET /v1/agents/{agent}/memories/{memory_id} (real ids)", "POST /v1/agents"):
            assert any(200 <= status < 300 for status in exercised[label]), (label, exercised[label])


def test_openai_routes_conform_to_the_served_schema(model_server):
    admin = model_server.key("fuzz-openai", admin=True)
    schema = schemathesis.openapi.from_url(f"{model_server.base_url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().path in OPENAI_PATHS]
    assert {op.path for op in operations} == OPENAI_PATHS
    failures: dict = {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, model_server.base_url, admin, mode, failures, max_examples=10)
    assert not failures, _report(failures)
