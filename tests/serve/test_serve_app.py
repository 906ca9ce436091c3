"""The runtime as a Ray Serve application (runtime/serve/) on a local Ray instance, over real HTTP through
Serve's proxy: the deploy config validates with Serve's own schema and deploys; the HTTP API's end-to-end
scenario (task, SSE with reconnect, second message) passes unchanged; memory errors cross the deployment
split as 404s; the OpenAI routes reach the model-worker deployment, streaming and not, and a malformed
request is a 400 in the API's error shape. The model is the tiny RANDOM checkpoint: tasks end `completed` or
`failed`, both terminal.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.e2e import test_http_server as http_e2e  # the HTTP API's end-to-end scenarios, reused unchanged
from tests.serve.conftest import REPO, ServeServer, load_config

MODEL = "model"  # the tiny checkpoint's directory name is its model name


def client(server: ServeServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60.0)


def test_config_validates_with_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    config = load_config()
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "runtime.serve:build_app" and app.route_prefix == "/"
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port not in (6379, 8000)
    assert {d.name for d in app.deployments} == {"MemoryServiceDeployment", "ModelWorkerDeployment", "ApiIngress"}
    assert app.args["redis_url"]


def test_only_serve_module_imports_ray():
    offenders = subprocess.run(["grep", "-rlE", r"^\s*(import ray|from ray)", "runtime"], cwd=REPO,
                               capture_output=True, text=True).stdout.split()
    assert offenders and all(p.startswith("runtime/serve/") for p in offenders if p.endswith(".py")), offenders
    out = subprocess.run([sys.executable, "-c", "import sys, runtime.api, runtime.local, runtime.service; "
                          "print('ray' in sys.modules)"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_deployed_app_answers_health_and_readiness(deployed):
    with httpx.Client(base_url=deployed.url, timeout=30.0) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"redis": "ok", "database": "ok", "model_worker": "ok"}
        assert http.get("/v1/agents").status_code == 401  # the API's auth, unchanged behind Serve


def test_task_events_reconnect_and_second_message_over_serve(deployed):
    http_e2e.test_task_events_reconnect_and_second_message(deployed)


def test_memory_calls_cross_the_split(deployed):
    with client(deployed) as http:
        assert http.post("/v1/agents", json={"name": "keeper", "instructions": "Remember things.",
                                             "tools": ["memory_search"]}).status_code == 201
        created = http.post("/v1/agents/keeper/memories", json={"text": "The user likes green tea."})
        assert created.status_code == 201, created.text
        memory = created.json()
        got = http.get(f"/v1/agents/keeper/memories/{memory['id']}")
        assert got.status_code == 200 and got.json()["text"] == "The user likes green tea."
        hits = http.post("/v1/agents/keeper/memories/search", json={"query": "green tea", "k": 3})
        assert hits.status_code == 200 and hits.json()["data"][0]["memory"]["id"] == memory["id"], hits.text
        missing = http.get("/v1/agents/keeper/memories/mem-does-not-exist")
        assert missing.status_code == 404, missing.text  # MemoryNotFound raised in the memory replica
        assert missing.json()["error"]["type"] == "not_found_error"
        assert http.delete(f"/v1/agents/keeper/memories/{memory['id']}").status_code == 204
        assert http.get(f"/v1/agents/keeper/memories/{memory['id']}").status_code == 404


def test_openai_routes_through_the_worker_deployment(deployed):
    messages = [{"role": "user", "content": "Say hi."}]
    with client(deployed) as http:
        models = http.get("/v1/models")
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [MODEL], models.text

        reply = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= body["usage"]["completion_tokens"] <= 8

        with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                                "max_tokens": 8, "stream": True}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            data = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]", data
        chunks = [json.loads(d) for d in data[:-1]]
        assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks), chunks
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), chunks[-1]

        text = http.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 4})
        assert text.status_code == 200 and text.json()["object"] == "text_completion", text.text

        for bad in ({"model": MODEL, "messages": "not a list"},
                    {"model": MODEL, "messages": "not a list", "stream": True},
                    {"model": MODEL, "messages": messages, "max_tokens": 10**7, "stream": True}):
            refused = http.post("/v1/chat/completions", json=bad)
            assert refused.status_code == 400, (bad, refused.status_code, refused.text)
            error = refused.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"], error
        unknown = http.post("/v1/chat/completions", json={"model": "nope", "messages": messages})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found", unknown.text


def test_build_app_needs_redis_and_composes_three_deployments(serve_model_dir, tmp_path):
    from ray.serve import Application

    from runtime.serve import build_app

    with pytest.raises(ValueError, match="redis_url"):
        build_app({"model_path": str(serve_model_dir), "data_dir": str(tmp_path)})
    app = build_app({"redis_url": "redis://127.0.0.1:6379/0", "model_path": str(serve_model_dir),
                     "data_dir": str(tmp_path), "embedder": "hashing"})
    assert isinstance(app, Application)
