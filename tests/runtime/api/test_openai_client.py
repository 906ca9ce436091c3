"""The official `openai` client against the app on a real uvicorn server, with a real ModelWorker on a tiny
random checkpoint (CPU): chat and text completions, streamed and not, JSON-schema constrained output,
usage, the model list, and errors the client understands."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.runtime.api.conftest import MODEL_NAME

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "n", "ok"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9},
                         "ok": {"type": "boolean"}}}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
MESSAGES = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Pick a color."}]


@pytest.fixture(scope="module")
def client(model_server) -> openai.OpenAI:
    key = model_server.key("openai-tenant")
    with openai.OpenAI(base_url=f"{model_server.base_url}/v1", api_key=key, max_retries=0, timeout=120) as c:
        yield c


def _check_usage(usage, max_tokens: int) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0 and 1 <= usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_models_lists_the_workers_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.list().data[0].object == "model"


def test_completions_plain_and_streamed_agree(client):
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=0)
    plain = client.completions.create(**kwargs)
    assert plain.object == "text_completion" and plain.model == MODEL_NAME and len(plain.choices) == 1
    choice = plain.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("length", "stop")
    _check_usage(plain.usage, 8)

    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text  # greedy decoding: the stream carries the same tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    assert chunks[-1].usage is not None and not chunks[-1].choices
    _check_usage(chunks[-1].usage, 8)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_chat_completions_plain_and_streamed_agree(client):
    kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    assert plain.object == "chat.completion" and plain.model == MODEL_NAME
    message = plain.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert plain.choices[0].finish_reason in ("length", "stop")
    _check_usage(plain.usage, 8)

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    _check_usage(chunks[-1].usage, 8)


def test_json_schema_output_parses_and_validates(client):
    for seed in (1, 2):
        reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=64, seed=seed,
                                               response_format=JSON_FORMAT)
        assert reply.choices[0].finish_reason == "stop", reply
        value = json.loads(reply.choices[0].message.content)
        jsonschema.validate(value, SCHEMA)
        _check_usage(reply.usage, 64)

    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=64, seed=3,
                                            response_format=JSON_FORMAT, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    _check_usage(chunks[-1].usage, 64)


def test_errors_reach_the_client_as_openai_errors(client, model_server):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    assert caught.value.code == "model_not_found" and "no-such-model" in caught.value.message
    assert caught.value.type == "invalid_request_error"  # as OpenAI types it; its clients may read it
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1_000_000)
    assert caught.value.param == "max_tokens"
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, response_format=bad_schema)
    assert caught.value.param == "response_format.json_schema.schema"
    with openai.OpenAI(base_url=f"{model_server.base_url}/v1", api_key="engram_wrong_key", max_retries=0) as other:
        with pytest.raises(openai.AuthenticationError):
            other.models.list()


def test_a_body_that_is_no_json_object_is_a_400_as_openai_answers(model_server):
    key = model_server.key("openai-tenant")
    with httpx.Client(base_url=model_server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        for path in ("/v1/chat/completions", "/v1/completions"):
            for body in ({"json": [1, 2]}, {"json": "text"}, {"content": b"{not json",
                                                               "headers": {"Content-Type": "application/json"}}):
                refused = http.post(path, **body)
                assert refused.status_code == 400, (path, body, refused.text)
                error = refused.json()["error"]
                assert error["type"] == "invalid_request_error" and "JSON object" in error["message"], error
        runtime_route = http.post("/v1/tasks", json=[1, 2])  # the runtime's own routes keep their 422
        assert runtime_route.status_code == 422, runtime_route.text


def test_an_agent_may_name_only_the_served_model(model_server):
    """An agent's `model` is the served model's name or "default"; any other name is refused when the agent is
    defined or changed (it used to be accepted and then ignored: the agent ran on the served model)."""
    key = model_server.key("agents-model-tenant")
    with httpx.Client(base_url=model_server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        refused = http.post("/v1/agents", json={"name": "elsewhere", "instructions": "Help.", "model": "gpt-4o"})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["field"] == "model" and "'gpt-4o' is not served here" in error["message"], error
        assert MODEL_NAME in error["message"]
        for name, model in (("named", MODEL_NAME), ("plain", "default")):
            created = http.post("/v1/agents", json={"name": name, "instructions": "Help.", "model": model})
            assert created.status_code == 201, created.text
        changed = http.patch("/v1/agents/named", json={"model": "gpt-4o"})
        assert changed.status_code == 422 and changed.json()["error"]["field"] == "model", changed.text
        assert http.get("/v1/agents/named").json()["model"] == MODEL_NAME  # unchanged
