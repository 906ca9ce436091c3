"""OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and `/v1/models` over a ModelWorker.

The translation between the wire models (defined in `openai_protocol.py`, re-exported here) and
`ModelWorker.submit` / `follow`. The handlers are plain async functions
(`ModelWorker.completions` etc. call them); a streaming request returns an async iterator of chunk
models, and `sse_lines` frames one as Server-Sent Events ending with `data: [DONE]`.

Errors: bad input raises `OpenAIError` (status 400, type "invalid_request_error", `param` naming the
field); an unknown model is 404 with code "model_not_found" (as OpenAI answers); a failure inside the
engine for this request is 500 "server_error". Unknown request fields are refused (400), not ignored.

Tools: with tool_choice "required" or a named function, decoding is constrained to the JSON
{"name": ..., "arguments": ...} of one of the allowed tools and returned as `message.tool_calls`;
with "auto", a `<tool_call>{...}</tool_call>` the model wrote is parsed out of the text.

It deliberately does not: serve n > 1, echo/suffix, penalties or logit_bias, speak HTTP (the serving
layer mounts these handlers), or stream tool-call arguments piece by piece (a call arrives whole).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
from pydantic import BaseModel, ValidationError

from model_worker.engine.sampling import SamplingParams
from model_worker.openai_protocol import (  # re-exported: the public wire models (see __all__)
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    FunctionCall,
    FunctionDefinition,
    FunctionName,
    JsonSchemaFormat,
    ModelCard,
    ModelList,
    NamedToolChoice,
    OpenAIError,
    PromptTokensDetails,
    ResponseFormat,
    StreamOptions,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    UsageInfo,
)
from model_worker.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from model_worker.worker import GenerateRequest, GenerateResponse, ModelWorker, RequestHandle, StreamDelta

__all__ = [
    "ChatChoice", "ChatChunkChoice", "ChatCompletionChunk", "ChatCompletionRequest", "ChatCompletionResponse",
    "ChatDelta", "ChatLogprobs", "ChatMessage", "CompletionChoice", "CompletionChunk", "CompletionLogprobs",
    "CompletionRequest", "CompletionResponse", "ErrorDetail", "ErrorResponse", "FunctionCall", "FunctionDefinition",
    "FunctionName", "JsonSchemaFormat", "ModelCard", "ModelList", "NamedToolChoice", "OpenAIError",
    "PromptTokensDetails", "ResponseFormat", "StreamOptions", "TokenLogprob", "Tool", "ToolCall", "ToolCallDelta",
    "TopLogprob", "UsageInfo", "create_chat_completion", "create_completion", "list_models", "sse_lines",
]

# ---- handlers ---------------------------------------------------------------------------------------


def list_models(worker: ModelWorker) -> ModelList:
    return ModelList(data=[ModelCard(id=worker.model_name, created=0)])


async def create_completion(worker: ModelWorker, body: Any) -> CompletionResponse | AsyncIterator[CompletionChunk]:
    req = _parse(CompletionRequest, body)
    _check_common(worker, req)
    try:
        prompt = worker.text_tokenizer("a text prompt").encode(req.prompt) if isinstance(req.prompt, str) \
            else list(req.prompt)
    except ValueError as exc:
        raise OpenAIError(400, f"prompt: {exc}", param="prompt") from exc
    max_tokens = _max_tokens(worker, len(prompt), req.max_tokens, "max_tokens", "prompt")
    params = _sampling(req, max_tokens, req.logprobs)
    handle = await _submit(worker, GenerateRequest(prompt_token_ids=prompt, params=params), "prompt", None)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": worker.model_name}
    if req.stream:
        return _completion_chunks(worker, handle, head, _include_usage(req))
    result = await _collect(worker, handle)
    choice = CompletionChoice(text=result.text, finish_reason=result.finish_reason,
                              logprobs=_completion_logprobs(worker, result.logprobs, 0))
    return CompletionResponse(**head, choices=[choice], usage=_usage(result))


async def create_chat_completion(worker: ModelWorker,
                                 body: Any) -> ChatCompletionResponse | AsyncIterator[ChatCompletionChunk]:
    req = _parse(ChatCompletionRequest, body)
    _check_common(worker, req)
    tools = _ToolPlan.of(req)
    schema = tools.constraint() if tools.forced else _response_schema(req.response_format)
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tool_dicts = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        prompt = worker.text_tokenizer("a chat request").encode_chat(req.messages, add_generation_prompt=True,
                                                                     tools=tool_dicts)
    except (TypeError, ValueError) as exc:
        raise OpenAIError(400, f"messages: {exc}", param="messages") from exc
    requested, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                        else (req.max_tokens, "max_tokens"))
    max_tokens = _max_tokens(worker, len(prompt), requested, param, "messages")
    params = _sampling(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, schema)
    schema_param = "tools" if tools.forced else "response_format"
    handle = await _submit(worker, GenerateRequest(prompt_token_ids=prompt, params=params), "messages", schema_param)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": worker.model_name}
    if req.stream:
        return _chat_chunks(worker, handle, head, tools, _include_usage(req))
    result = await _collect(worker, handle)
    content, calls = tools.split(result.text)
    finish = "tool_calls" if calls else result.finish_reason
    message = ChatMessage(content=content, tool_calls=calls or None)
    choice = ChatChoice(message=message, finish_reason=finish, logprobs=_chat_logprobs(worker, result.logprobs))
    return ChatCompletionResponse(**head, choices=[choice], usage=_usage(result))


async def sse_lines(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """`data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`; an OpenAIError mid-stream becomes an error event."""
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except OpenAIError as exc:
            yield f"data: {exc.to_response().model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


# ---- request translation ----------------------------------------------------------------------------

_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise OpenAIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param_of(error["loc"])
        raise OpenAIError(400, f"{param or 'body'}: {error['msg']}", param=param) from None


def _param_of(loc: tuple) -> str | None:
    """pydantic's error location as an OpenAI param ("tools[0].function.name"), union tags dropped."""
    parts = ""
    for item in loc:
        if isinstance(item, int):
            parts += f"[{item}]"
        elif isinstance(item, str) and item.isidentifier() and item not in _TYPE_TAGS:
            parts += f".{item.removesuffix('_')}" if parts else item
    return parts or None


def _check_common(worker: ModelWorker, req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.model != worker.model_name:
        raise OpenAIError(404, f"The model '{req.model}' does not exist; this worker serves '{worker.model_name}'",
                          param="model", code="model_not_found")
    if req.n != 1:
        raise OpenAIError(400, f"n: only n=1 is supported, got {req.n}", param="n")
    if req.stream_options is not None and not req.stream:
        raise OpenAIError(400, "stream_options: only allowed with stream: true", param="stream_options")


def _max_tokens(worker: ModelWorker, prompt_len: int, requested: int | None, param: str, prompt_param: str) -> int:
    """The max_tokens to run with: `requested`, or all the room left in the context when None."""
    limit = worker.max_sequence_tokens
    if prompt_len >= limit:
        raise OpenAIError(400, f"{prompt_param}: the prompt has {prompt_len} tokens; this model's context is "
                               f"{limit} tokens, leaving no room for output", param=prompt_param,
                          code="context_length_exceeded")
    if requested is None:
        return limit - prompt_len
    if requested < 1 or prompt_len + requested > limit:
        raise OpenAIError(400, f"{param}: must be between 1 and {limit - prompt_len} (context {limit} tokens, "
                               f"prompt {prompt_len} tokens), got {requested}", param=param)
    return requested


def _sampling(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None,
              json_schema: dict | None = None) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=req.seed, stop=req.stop or [], logprobs=logprobs, json_schema=json_schema)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param_of(error["loc"])
        raise OpenAIError(400, f"{param}: {error['msg']}", param=param) from None


def _include_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


def _check_schema(schema: dict, param: str) -> dict:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise OpenAIError(400, f"{param}: not a valid JSON schema: {exc.message}", param=param) from None
    return schema


def _response_schema(response_format: ResponseFormat | None) -> dict | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    return _check_schema(response_format.json_schema.schema_, "response_format.json_schema.schema")


async def _submit(worker: ModelWorker, request: GenerateRequest, prompt_param: str,
                  schema_param: str | None) -> RequestHandle:
    """Submit one request; the engine's refusals become 400s naming the parameter they concern."""
    try:
        (handle,) = await worker.submit([request])
    except ValueError as exc:
        message = str(exc).removeprefix("requests[0]: ")
        param = (prompt_param if message.startswith("prompt") else
                 schema_param if message.startswith(("json_schema", "regex")) else None)
        raise OpenAIError(400, message, param=param) from None
    return handle


async def _collect(worker: ModelWorker, handle: RequestHandle) -> GenerateResponse:
    result = await worker.collect(handle)
    if result.error is not None:
        raise OpenAIError(500, f"generation failed: {result.error}")
    return result


def _usage(result: GenerateResponse | StreamDelta) -> UsageInfo:
    u = result.usage
    return UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                     total_tokens=u.prompt_tokens + u.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens))


# ---- tools ------------------------------------------------------------------------------------------


class _ToolPlan:
    """What tool_choice means for one request: the allowed tools, and whether a call is forced."""

    def __init__(self, tools: list[Tool], mode: str):
        self.tools, self.mode = tools, mode  # mode: "none" | "auto" | "forced"
        self.forced = mode == "forced"

    @classmethod
    def of(cls, req: ChatCompletionRequest) -> _ToolPlan:
        tools, choice = req.tools or [], req.tool_choice
        if choice is not None and choice != "none" and not tools:
            raise OpenAIError(400, "tool_choice: needs a non-empty tools list", param="tool_choice")
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise OpenAIError(400, "tools: function names must be unique", param="tools")
        for i, tool in enumerate(tools):
            _check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        forced = isinstance(choice, NamedToolChoice) or choice == "required"
        if forced and req.response_format is not None and req.response_format.type != "text":
            raise OpenAIError(400, "response_format: cannot be combined with a forced tool call",
                              param="response_format")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise OpenAIError(400, f"tool_choice: no tool named {choice.function.name!r} in tools",
                                  param="tool_choice")
            return cls([t for t in tools if t.function.name == choice.function.name], "forced")
        if forced:
            return cls(tools, "forced")
        return cls(tools, "none" if choice == "none" or not tools else "auto")

    def constraint(self) -> dict:
        """JSON schema of {"name": <one of the tools>, "arguments": <that tool's parameters>}."""
        options = [{"type": "object", "properties": {"name": {"enum": [t.function.name]},
                                                     "arguments": t.function.parameters},
                    "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def split(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output; text that is not a valid call stays content."""
        if self.forced:
            call = self._call(text)
            return (None, [call]) if call is not None else (text, [])
        if self.mode == "none":
            return text, []
        content, calls, rest = "", [], text
        while (start := rest.find(TOOL_CALL_OPEN)) >= 0 and (end := rest.find(TOOL_CALL_CLOSE, start)) >= 0:
            call = self._call(rest[start + len(TOOL_CALL_OPEN):end])
            content += rest[:start] if call is not None else rest[:end + len(TOOL_CALL_CLOSE)]
            calls += [call] if call is not None else []
            rest = rest[end + len(TOOL_CALL_CLOSE):]
        content += rest
        return (content or None) if calls else content, calls

    def _call(self, text: str) -> ToolCall | None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        names = {t.function.name for t in self.tools}
        if not (isinstance(value, dict) and value.get("name") in names and isinstance(value.get("arguments"), dict)):
            return None
        arguments = json.dumps(value["arguments"], ensure_ascii=False)
        return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=value["name"],
                                                                                   arguments=arguments))


class _ContentFilter:
    """Streams content while holding back what may be a tool call, so chunks agree with `split`."""

    def __init__(self, plan: _ToolPlan):
        self.plan, self.held, self.in_call = plan, "", plan.forced

    def feed(self, text: str) -> str:
        """The part of `text` (after earlier held-back text) that is certainly content."""
        if self.plan.mode == "none":
            return text
        self.held += text
        if self.in_call:
            return ""
        start = self.held.find(TOOL_CALL_OPEN)
        if start >= 0:
            out, self.held, self.in_call = self.held[:start], self.held[start:], True
            return out
        keep = next((k for k in range(min(len(self.held), len(TOOL_CALL_OPEN) - 1), 0, -1)
                     if TOOL_CALL_OPEN.startswith(self.held[-k:])), 0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(remaining content, tool calls) once the output is complete."""
        content, calls = self.plan.split(self.held)
        return content or "", calls


# ---- streams ----------------------------------------------------------------------------------------


async def _completion_chunks(worker: ModelWorker, handle: RequestHandle, head: dict,
                             include_usage: bool) -> AsyncIterator[CompletionChunk]:
    offset, last = 0, None
    async with contextlib.aclosing(worker.follow(handle)) as deltas:
        async for last in deltas:
            _raise_if_failed(last)
            logprobs = _completion_logprobs(worker, last.logprobs, offset)
            offset += len(last.text)
            choice = CompletionChoice(text=last.text, finish_reason=last.finish_reason, logprobs=logprobs)
            yield CompletionChunk(**head, choices=[choice])
    if include_usage:
        yield CompletionChunk(**head, choices=[], usage=_usage(last))


async def _chat_chunks(worker: ModelWorker, handle: RequestHandle, head: dict, plan: _ToolPlan,
                       include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    yield ChatCompletionChunk(**head, choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
    content_filter, last = _ContentFilter(plan), None
    async with contextlib.aclosing(worker.follow(handle)) as deltas:
        async for last in deltas:
            _raise_if_failed(last)
            text = content_filter.feed(last.text)
            logprobs = _chat_logprobs(worker, last.logprobs)
            if last.finish_reason is None:
                if text or logprobs is not None:
                    yield ChatCompletionChunk(**head, choices=[ChatChunkChoice(delta=ChatDelta(content=text),
                                                                               logprobs=logprobs)])
                continue
            tail, calls = content_filter.finish()
            delta = ChatDelta(content=(text + tail) or None,
                              tool_calls=[ToolCallDelta(index=i, **c.model_dump()) for i, c in enumerate(calls)]
                              or None)
            finish = "tool_calls" if calls else last.finish_reason
            yield ChatCompletionChunk(**head, choices=[ChatChunkChoice(delta=delta, finish_reason=finish,
                                                                       logprobs=logprobs)])
    if include_usage:
        yield ChatCompletionChunk(**head, choices=[], usage=_usage(last))


def _raise_if_failed(delta: StreamDelta) -> None:
    if delta.error is not None:
        raise OpenAIError(500, f"generation failed: {delta.error}")


# ---- logprobs ---------------------------------------------------------------------------------------


def _token_text(worker: ModelWorker, token_id: int) -> str:
    if worker.tokenizer is None:
        return ""  # a model without a tokenizer has ids, no text
    return worker.tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(worker: ModelWorker, entries: list[dict] | None, offset: int) -> CompletionLogprobs | None:
    """Legacy logprobs; text_offset counts characters of the tokens' own texts from `offset`."""
    if entries is None:
        return None
    tokens = [_token_text(worker, e["token_id"]) for e in entries]
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    top = [{_token_text(worker, t): lp for t, lp in e["top"]} for e in entries]
    return CompletionLogprobs(tokens=tokens, token_logprobs=[e["logprob"] for e in entries], top_logprobs=top,
                              text_offset=offsets)


def _chat_logprobs(worker: ModelWorker, entries: list[dict] | None) -> ChatLogprobs | None:
    """Chat logprobs; `bytes` are the UTF-8 bytes of each token's decoded text."""
    if entries is None:
        return None

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = _token_text(worker, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChatLogprobs(content=[TokenLogprob(**top(e["token_id"], e["logprob"]).model_dump(),
                                              top_logprobs=[top(t, lp) for t, lp in e["top"]]) for e in entries])
