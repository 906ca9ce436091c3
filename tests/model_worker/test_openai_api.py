"""The OpenAI-compatible handlers over a real tiny engine: responses against the worker and the model,
streams against non-streamed output, constrained outputs against their schemas, and every error shape."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch

from model_worker.engine.sampling import SamplingParams
from model_worker.openai_api import (
    ChatCompletionRequest,
    CompletionChoice,
    CompletionChunk,
    OpenAIError,
    _ContentFilter,
    _ToolPlan,
    sse_lines,
)
from model_worker.worker import GenerateRequest
from tests.model_worker.engine.engine_fixtures import demo_tokenizer, greedy, random_prompt
from tests.model_worker.test_worker import run_with_worker, shared_model, wait_idle

MODEL = "tiny"  # the name run_with_worker's worker serves
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12 plus 30?"}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "boolean"}, "b": {"enum": [1, 2, 3]}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
PERSON = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": [1, 2, 3]},
                                           "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
          "required": ["ok", "size", "tags"], "additionalProperties": False}


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 8, **fields}


def _completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "The agent called the", "max_tokens": 8, **fields}


async def _sse_payloads(chunks) -> list[dict]:
    """Parse SSE lines; checks the framing and the [DONE] terminator."""
    lines = [line async for line in sse_lines(chunks)]
    assert lines[-1] == "data: [DONE]\n\n"
    assert all(line.startswith("data: ") and line.endswith("\n\n") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_models_lists_the_served_model():
    async def test(worker):
        return worker.models()

    listing = run_with_worker(test).model_dump()
    assert listing["object"] == "list"
    assert [(m["id"], m["object"]) for m in listing["data"]] == [(MODEL, "model")]


@pytest.mark.parametrize("prompt", ["The agent called the", random_prompt(15, seed=3)])
def test_completion_equals_worker_generate_and_counts_usage(prompt):
    tok = demo_tokenizer()
    prompt_ids = tok.encode(prompt) if isinstance(prompt, str) else prompt

    async def test(worker):
        response = await worker.completions(_completion(prompt=prompt, temperature=0, max_tokens=7))
        (reference,) = await worker.generate([GenerateRequest(prompt_token_ids=prompt_ids, params=greedy(7))])
        return response, reference

    response, reference = run_with_worker(test)
    choice = response.choices[0]
    assert response.object == "text_completion" and response.model == MODEL and response.id.startswith("cmpl-")
    assert choice.text == reference.text
    assert choice.finish_reason == reference.finish_reason == "length"  # the random model never says EOS this soon
    usage = response.usage.model_dump()
    assert usage == {"prompt_tokens": len(prompt_ids), "completion_tokens": 7, "total_tokens": len(prompt_ids) + 7,
                     "prompt_tokens_details": {"cached_tokens": 0}}


def test_completion_logprobs_match_the_models_full_forward():
    prompt = random_prompt(12, seed=4)

    async def test(worker):
        response = await worker.completions(_completion(prompt=prompt, temperature=0, max_tokens=8, logprobs=3))
        (tokens,) = await worker.generate([GenerateRequest(prompt_token_ids=prompt, params=greedy(8))])
        return response.choices[0].logprobs, tokens.token_ids

    logprobs, generated = run_with_worker(test)
    logits = shared_model()(torch.tensor([prompt + generated]))[0, len(prompt) - 1:-1]  # fp32 cache (auto)
    expected = logits.log_softmax(-1)
    want = expected.gather(1, torch.tensor(generated)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs), want, atol=2e-3, rtol=0)
    assert generated == expected.argmax(-1).tolist()  # greedy
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]


def test_chat_logprobs_agree_with_completion_logprobs_of_the_rendered_prompt():
    prompt_ids = demo_tokenizer().encode_chat(CHAT)

    async def test(worker):
        chat = await worker.chat_completions(_chat(temperature=0, logprobs=True, top_logprobs=2))
        completion = await worker.completions(_completion(prompt=prompt_ids, temperature=0, logprobs=2))
        return chat.choices[0], completion.choices[0]

    chat, completion = run_with_worker(test)
    assert chat.message.content == completion.text
    content = chat.logprobs.content
    assert [c.logprob for c in content] == completion.logprobs.token_logprobs
    assert [c.token for c in content] == completion.logprobs.tokens
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)


@pytest.mark.parametrize("endpoint, extra", [("completions", {}), ("chat_completions", {}),
                                             ("chat_completions", {"tools": TOOLS, "tool_choice": "auto"})])
def test_stream_chunks_concatenate_to_the_non_stream_text(endpoint, extra):
    body = (_completion if endpoint == "completions" else _chat)(temperature=0.9, seed=5, max_tokens=12, **extra)

    async def test(worker):
        handler = getattr(worker, endpoint)
        whole = await handler(body)
        chunks = await handler({**body, "stream": True, "stream_options": {"include_usage": True}})
        return whole, await _sse_payloads(chunks)

    whole, payloads = run_with_worker(test)
    *choice_chunks, usage_chunk = payloads
    assert len({p["id"] for p in payloads}) == 1 and payloads[0]["id"].startswith(whole.id.split("-")[0] + "-")
    if endpoint == "completions":
        text = "".join(c["choices"][0]["text"] for c in choice_chunks)
        assert text == whole.choices[0].text
    else:
        assert choice_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(p["object"] == "chat.completion.chunk" for p in payloads)
        text = "".join(c["choices"][0]["delta"]["content"] or "" for c in choice_chunks)
        assert text == whole.choices[0].message.content
    assert [c["choices"][0]["finish_reason"] for c in choice_chunks][-1] == whole.choices[0].finish_reason
    assert all(c["usage"] is None for c in choice_chunks)
    assert usage_chunk["choices"] == []
    usage = whole.usage.model_dump()  # the streamed run reuses the first run's full pages (one token left to compute)
    usage["prompt_tokens_details"]["cached_tokens"] = (usage["prompt_tokens"] - 1) // 64 * 64
    assert usage_chunk["usage"] == usage


def test_stop_string_cuts_the_output_before_it():
    async def test(worker):
        free = await worker.completions(_completion(temperature=0, max_tokens=10))
        text = free.choices[0].text
        stop = text[len(text) // 2:len(text) // 2 + 2]
        stopped = await worker.completions(_completion(temperature=0, max_tokens=10, stop=[stop, "\u2603"]))
        return text, stop, stopped.choices[0]

    text, stop, stopped = run_with_worker(test)
    assert stopped.text == text[:text.index(stop)]
    assert stopped.finish_reason == "stop"


def test_json_schema_response_format_output_parses_and_validates():
    response_format = {"type": "json_schema", "json_schema": {"name": "flags", "schema": PERSON}}

    async def test(worker):
        bodies = [_chat(seed=seed, max_tokens=200, response_format=response_format) for seed in range(6)]
        return await asyncio.gather(*(worker.chat_completions(b) for b in bodies))

    for response in run_with_worker(test):
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_response_format_constrains_like_an_object_schema():
    """Free-form objects from a random model rarely close, so compare with the grammar request it means."""
    params = SamplingParams(max_tokens=20, seed=3, json_schema={"type": "object"})

    async def test(worker):
        response = await worker.chat_completions(_chat(seed=3, max_tokens=20, response_format={"type": "json_object"}))
        (reference,) = await worker.generate([GenerateRequest(messages=CHAT, params=params)])
        unconstrained = await worker.chat_completions(_chat(seed=3, max_tokens=20))
        return response.choices[0].message.content, reference.text, unconstrained.choices[0].message.content

    constrained, reference, unconstrained = run_with_worker(test)
    assert constrained == reference and constrained.startswith("{")
    assert unconstrained != constrained


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_choice_yields_a_valid_tool_call_streamed_alike(tool_choice):
    params_of = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    async def test(worker):
        results = []
        for seed in range(3):
            body = _chat(seed=seed, max_tokens=100, tools=TOOLS, tool_choice=tool_choice)
            whole = await worker.chat_completions(body)
            payloads = await _sse_payloads(await worker.chat_completions({**body, "stream": True}))
            results.append((whole, payloads))
        return results

    for whole, payloads in run_with_worker(test):
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(tool_choice, dict):
            assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), params_of[call.function.name])
        last = payloads[-1]["choices"][0]
        assert last["finish_reason"] == "tool_calls"
        (streamed,) = last["delta"]["tool_calls"]
        assert (streamed["index"], streamed["function"]) == (0, call.function.model_dump())


def _plan(tool_choice="auto") -> _ToolPlan:
    return _ToolPlan.of(ChatCompletionRequest.model_validate(_chat(tools=TOOLS, tool_choice=tool_choice)))


@pytest.mark.parametrize("text, content, calls", [
    ('Sure. <tool_call>{"name": "add", "arguments": {"a": true, "b": 2}}</tool_call>', "Sure. ",
     [("add", {"a": True, "b": 2})]),
    ('<tool_call>{"name": "add", "arguments": {"a": false, "b": 1}}</tool_call>', None,
     [("add", {"a": False, "b": 1})]),
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call> and <tool_call>{bad json</tool_call>',
     '<tool_call>{"name": "nope", "arguments": {}}</tool_call> and <tool_call>{bad json</tool_call>', []),
    ("no call, just <tool_c", "no call, just <tool_c", []),
])
def test_auto_tool_calls_are_parsed_from_text_and_streamed_alike(text, content, calls):
    got_content, got_calls = _plan().split(text)
    assert got_content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got_calls] == calls
    for piece in (1, 3, 7):  # the same text arriving in deltas of different sizes
        stream_filter = _ContentFilter(_plan())
        streamed = "".join(stream_filter.feed(text[i:i + piece]) for i in range(0, len(text), piece))
        tail, stream_calls = stream_filter.finish()
        assert streamed + tail == (content or "")
        assert [c.function.model_dump() for c in stream_calls] == [c.function.model_dump() for c in got_calls]
    none_content, none_calls = _plan("none").split(text)
    assert (none_content, none_calls) == (text, [])


_LONG_PROMPT = random_prompt(2100, seed=6)  # the tiny model's context is 2048
ERROR_CASES = [
    ("completions", _completion(model="gpt-4"), 404, "model", "model_not_found"),
    ("completions", _completion(n=2), 400, "n", None),
    ("completions", _completion(prompt=_LONG_PROMPT), 400, "prompt", "context_length_exceeded"),
    ("completions", _completion(max_tokens=0), 400, "max_tokens", None),
    ("completions", _completion(max_tokens=4000), 400, "max_tokens", None),
    ("completions", _completion(prompt=[5, 10**6]), 400, "prompt", None),
    ("completions", _completion(prompt=[]), 400, "prompt", None),
    ("completions", _completion(temperature="hot"), 400, "temperature", None),
    ("completions", _completion(top_p=0), 400, "top_p", None),
    ("completions", _completion(best_of=2), 400, "best_of", None),
    ("completions", _completion(frequency_penalty=0.5), 400, "frequency_penalty", None),
    ("completions", _completion(stop=[""]), 400, "stop", None),
    ("completions", _completion(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("completions", ["not", "an", "object"], 400, None, None),
    ("chat_completions", _chat(model="gpt-4", stream=True), 404, "model", "model_not_found"),
    ("chat_completions", _chat(messages=[]), 400, "messages", None),
    ("chat_completions", _chat(messages="hi"), 400, "messages", None),
    ("chat_completions", _chat(messages=[{"role": "user"}]), 400, "messages", None),
    ("chat_completions", _chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages", None),
    ("chat_completions", _chat(messages=[{"role": "user", "content": "x" * 9000}]), 400, "messages",
     "context_length_exceeded"),
    ("chat_completions", _chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("chat_completions", _chat(top_logprobs=2), 400, "top_logprobs", None),
    ("chat_completions", _chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}),
     400, "response_format.json_schema.schema", None),
    ("chat_completions", _chat(response_format={"type": "json_schema"}), 400, "response_format", None),
    ("chat_completions", _chat(response_format={"type": "xml"}), 400, "response_format.type", None),
    ("chat_completions", _chat(tool_choice="required"), 400, "tool_choice", None),
    ("chat_completions", _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), 400,
     "tool_choice", None),
    ("chat_completions", _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]),
     400, "tools[0].function.parameters", None),
    ("chat_completions", _chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), 400,
     "tools[0].function.name", None),
    ("chat_completions", _chat(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), 400,
     "response_format", None),
]


@pytest.mark.parametrize("endpoint, body, status, param, code", ERROR_CASES,
                         ids=[f"{i}-{case[0]}-{case[3]}" for i, case in enumerate(ERROR_CASES)])
def test_bad_input_gets_an_openai_shaped_error(endpoint, body, status, param, code):
    async def test(worker):
        with pytest.raises(OpenAIError) as caught:
            await getattr(worker, endpoint)(body)
        await wait_idle(worker)
        return caught.value, worker.engine.stats["computed_tokens"]

    error, computed = run_with_worker(test)
    assert computed == 0  # refused before anything ran
    assert error.status_code == status
    body = error.to_response().model_dump()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert (body["error"]["param"], body["error"]["code"]) == (param, code)
    assert body["error"]["message"]


def test_sse_turns_a_mid_stream_failure_into_an_error_event_then_done():
    async def chunks():
        yield CompletionChunk(id="cmpl-1", created=0, model=MODEL, choices=[CompletionChoice(text="hi",
                                                                                             finish_reason=None)])
        raise OpenAIError(500, "generation failed: boom")

    payloads = asyncio.run(_sse_payloads(chunks()))
    assert payloads[0]["choices"][0]["text"] == "hi"
    assert payloads[1] == {"error": {"message": "generation failed: boom", "type": "server_error", "param": None,
                                     "code": None}}


def test_closing_a_chat_stream_aborts_the_request():
    async def test(worker):
        chunks = await worker.chat_completions(_chat(max_tokens=1500, stream=True))
        lines = sse_lines(chunks)
        first_lines = [await anext(lines) for _ in range(3)]
        await lines.aclose()
        await wait_idle(worker)
        return first_lines, worker.engine.has_unfinished(), worker.engine.stats["computed_tokens"]

    first_lines, unfinished, computed = run_with_worker(test)
    assert not unfinished and computed < 500  # aborted long before its 1500 tokens
    assert all(line.startswith("data: {") for line in first_lines)
