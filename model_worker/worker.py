"""ModelWorker: the async face of one LLMEngine (`generate`, `stream`, and the OpenAI handlers).

One background thread owns the engine: it applies queued commands (add a request, abort one), runs
`LLMEngine.step()` while any request is pending and sleeps on a condition when idle. The event loop
never calls the engine and never waits for a step: it queues a command under a short lock and reads
results from a per-request asyncio queue that the engine thread fills with `loop.call_soon_threadsafe`.

Lifecycle of a request: `submit` queues a call's requests as one command and waits until the engine
thread accepted all of them (if it refuses one, it adds none and `submit` raises ValueError);
`follow` yields a request's deltas and aborts it in the engine when the consumer stops early (task
cancelled, async generator closed). A failure inside one request (an `error` in its RequestOutput)
ends only that request; an exception from `step()` itself ends every request then in flight with a
RuntimeError, and the thread keeps serving new ones.

It deliberately does not speak HTTP or SSE framing beyond `openai_api.sse_lines`, batch requests
itself (the scheduler does), or import Ray.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from model_worker.engine.engine import EngineConfig, LLMEngine, RequestOutput, Usage
from model_worker.engine.sampling import SamplingParams
from model_worker.model import CausalLM
from model_worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class GenerateRequest(pydantic.BaseModel):
    """One generation: exactly one of `prompt` (text), `prompt_token_ids` or `messages` (chat).

    `tools` (JSON schemas) are shown to the chat template with `messages`; text prompts are encoded
    with the tokenizer's special tokens (BOS), chat prompts by the template.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    params: SamplingParams = pydantic.Field(default_factory=SamplingParams)

    @pydantic.model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        given = [name for name in ("prompt", "prompt_token_ids", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"prompt: give exactly one of prompt, prompt_token_ids, messages (got {given or 'none'})")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools: only a chat request (messages) can carry tools")
        return self


@dataclass
class StreamDelta:
    """What one engine step added to a request: new tokens, their text, and the running usage."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # set on the last delta: "stop" | "length" | "error"
    usage: Usage
    logprobs: list[dict] | None = None  # per new token {"token_id", "logprob", "top": [(id, lp), ...]}
    error: str | None = None  # with finish_reason "error": what went wrong in this request


@dataclass
class GenerateResponse:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    logprobs: list[dict] | None = None
    error: str | None = None


@dataclass(eq=False)
class RequestHandle:
    """An accepted request: its id, prompt length and the queue its deltas arrive on."""

    request_id: str
    num_prompt_tokens: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    done: bool = False


@dataclass
class _Submission:
    """One submit() call: its requests are added to the engine together or not at all."""

    handles: list[RequestHandle]
    prompts: list[list[int]]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future  # result None, or the refusal (ValueError naming requests[i])


class ModelWorker:
    """Serves one model: async generate/stream over an LLMEngine driven by one background thread."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, engine_config: EngineConfig | None = None,
                 model_name: str = "engram-model"):
        """tokenizer None: a model without one serves token-id requests only (see `text_tokenizer`)."""
        self.engine = LLMEngine(model, tokenizer, engine_config, model_name=model_name)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._wakeup = threading.Condition(threading.Lock())
        self._inbox: collections.deque[_Submission | str] = collections.deque()  # submissions, or request ids to abort
        self._handles: dict[str, RequestHandle] = {}  # live requests (engine thread only)
        self._engine_busy = False  # the thread is mid-round or the engine has unfinished work (under the lock)
        self._closed = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                        model_name: str | None = None, pack_weights: bool = True,
                        engram_tables: Any = None, **engine_settings: Any) -> ModelWorker:
        """Load model + tokenizer from a checkpoint directory; engine_settings are EngineConfig fields. The
        tokenizer is read first (a broken one fails before the weights load); a checkpoint without
        `tokenizer.json` is served for token-id requests only. pack_weights=False runs every float layer by torch's
        kernels without the panel-packed weight copies (`load_model`): half the fp32 weight memory, slower CPU
        decode. engram_tables: an EngramTableClient (e.g. over
        the memory service) to serve the Engram rows; the checkpoint's own tables are then not loaded."""
        from model_worker import load_model, load_tokenizer

        check_device(device)
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_settings) - known)
        if unknown:
            raise ValueError(f"engine_settings: unknown setting(s) {unknown}; known: {sorted(known)}")
        tokenizer = load_tokenizer(path) if (Path(path) / "tokenizer.json").is_file() else None
        if tokenizer is None:
            log.info("%s has no tokenizer.json: serving token-id requests only", path)
        if _model_type(path) == "deepseek_v4":
            from model_worker.v4 import load_v4_model

            model = load_v4_model(path, dtype=dtype, engram_tables=engram_tables is None).to(device)
        else:
            model = load_model(path, dtype=dtype, device=device, pack_weights=pack_weights,
                               engram_tables=engram_tables is None)
        if engram_tables is not None and model.config.uses_engram:
            model.attach_engram_tables(engram_tables)
        return cls(model, tokenizer, EngineConfig(**engine_settings), model_name or Path(path).name)

    # ---- public async API -------------------------------------------------------------------------
    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResponse]:
        """Run all requests to completion (batched together by the engine); results in input order.

        A request that fails inside the engine comes back with finish_reason "error" and `error` set;
        the others are unaffected. Raises ValueError (nothing runs) when the engine refuses one.
        """
        handles = await self.submit(requests)
        try:
            results = await asyncio.gather(*(self.collect(h) for h in handles), return_exceptions=True)
        finally:
            for handle in handles:
                self._abort(handle)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    def stream(self, request: GenerateRequest) -> AsyncIterator[StreamDelta]:
        """Deltas of one request as the engine produces them; closing or cancelling aborts it.

        The request is submitted on the first `__anext__`, which raises ValueError if it is refused.
        """
        if not isinstance(request, GenerateRequest):
            raise TypeError(f"request must be a GenerateRequest, got {type(request).__name__}")
        return self._deltas(None, request)

    async def submit(self, requests: Sequence[GenerateRequest]) -> list[RequestHandle]:
        """Queue requests and wait until the engine accepted all of them.

        Raises ValueError naming `requests[i]` for a request that cannot be served; the engine then
        adds none of this call's requests (a call is accepted whole or not at all).
        """
        if isinstance(requests, GenerateRequest) or not isinstance(requests, Sequence):
            raise TypeError("requests must be a list of GenerateRequest")
        for i, request in enumerate(requests):
            if not isinstance(request, GenerateRequest):
                raise TypeError(f"requests[{i}] must be a GenerateRequest, got {type(request).__name__}")
        prompts = []
        for i, request in enumerate(requests):
            try:
                prompts.append(self.encode_prompt(request))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"requests[{i}]: {exc}") from exc
        if not prompts:
            return []
        loop = asyncio.get_running_loop()
        handles = [RequestHandle(f"req-{uuid.uuid4().hex}", len(p), asyncio.Queue(), loop) for p in prompts]
        submission = _Submission(handles, prompts, [r.params for r in requests], loop, loop.create_future())
        self._send(submission)
        try:
            await submission.accepted
        except BaseException:  # refused (nothing was added), or cancelled while waiting
            for handle in handles:
                self._abort(handle)
            raise
        return handles

    def follow(self, handle: RequestHandle) -> AsyncIterator[StreamDelta]:
        """Deltas of a submitted request; stopping early (close, cancel) aborts it in the engine."""
        if not isinstance(handle, RequestHandle):
            raise TypeError(f"handle must be a RequestHandle from submit(), got {type(handle).__name__}")
        return self._deltas(handle)

    def encode_prompt(self, request: GenerateRequest) -> list[int]:
        """Token ids of the request's prompt (text, ids as given, or the chat template's rendering)."""
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.prompt is not None:
            return self.text_tokenizer("a text prompt").encode(request.prompt)
        return self.text_tokenizer("a chat request").encode_chat(request.messages, add_generation_prompt=True,
                                                                  tools=request.tools)

    def text_tokenizer(self, what: str) -> Tokenizer:
        """The tokenizer, for `what` (e.g. "a text prompt"); ValueError saying so when this model has none."""
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and model {self.model_name!r} has none (no tokenizer.json "
                             f"in its checkpoint): send prompt token ids")
        return self.tokenizer

    @property
    def max_sequence_tokens(self) -> int:
        """Most tokens (prompt + output) one request may hold: the model's context, capped by the cache."""
        cache_tokens = self.engine.block_manager.num_blocks * self.engine.config.block_size
        return min(self.engine.max_model_len, cache_tokens)

    def is_idle(self) -> bool:
        """True when no command is queued, no request is live and the engine has no unfinished work."""
        with self._wakeup:
            return not self._inbox and not self._handles and not self._engine_busy

    async def close(self) -> None:
        """Stop the engine thread; requests still in flight end with a RuntimeError."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> ModelWorker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- OpenAI-compatible handlers (translation lives in openai_api) -----------------------------
    async def completions(self, body: dict[str, Any]):
        """POST /v1/completions: a CompletionResponse, or (stream) an async iterator of CompletionChunk."""
        from model_worker import openai_api

        return await openai_api.create_completion(self, body)

    async def chat_completions(self, body: dict[str, Any]):
        """POST /v1/chat/completions: a ChatCompletionResponse, or (stream) ChatCompletionChunks."""
        from model_worker import openai_api

        return await openai_api.create_chat_completion(self, body)

    def models(self):
        """GET /v1/models: a ModelList holding this worker's model."""
        from model_worker import openai_api

        return openai_api.list_models(self)

    # ---- event-loop side --------------------------------------------------------------------------
    def _send(self, *commands: _Submission | str) -> None:
        with self._wakeup:
            if self._closed:
                raise RuntimeError("ModelWorker is closed")
            self._inbox.extend(commands)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="model-worker-engine", daemon=True)
                self._thread.start()
            self._wakeup.notify()

    def _abort(self, handle: RequestHandle) -> None:
        if not handle.done:
            handle.done = True
            with self._wakeup:
                if not self._closed:
                    self._inbox.append(handle.request_id)
                    self._wakeup.notify()

    async def _deltas(self, handle: RequestHandle | None,
                      request: GenerateRequest | None = None) -> AsyncIterator[StreamDelta]:
        """The one place deltas are read: submits `request` first when no handle is given."""
        if handle is None:
            (handle,) = await self.submit([request])
        try:
            while True:
                item = await handle.queue.get()
                if isinstance(item, BaseException):
                    handle.done = True
                    raise item
                delta = _delta_of(item)
                if delta.finish_reason is not None:
                    handle.done = True
                yield delta
                if handle.done:
                    return
        finally:
            self._abort(handle)  # no-op when the request finished

    async def collect(self, handle: RequestHandle) -> GenerateResponse:
        """Run a submitted request to its end and gather its deltas (cancelling aborts it)."""
        text, token_ids, logprobs = [], [], []
        last = None
        async with contextlib.aclosing(self._deltas(handle)) as deltas:
            async for last in deltas:
                text.append(last.text)
                token_ids += last.token_ids
                logprobs += last.logprobs or []
        return GenerateResponse(handle.request_id, "".join(text), token_ids, last.finish_reason, last.usage,
                                logprobs if last.logprobs is not None else None, last.error)

    # ---- engine thread ----------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._wakeup:
                while not self._closed and not self._inbox and not self._engine_busy:
                    self._wakeup.wait()
                if self._closed:
                    break
                commands = list(self._inbox)
                self._inbox.clear()
                self._engine_busy = True  # until this round is done, so is_idle() never sees a gap
            outputs: list[RequestOutput] = []
            try:
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
            except Exception as exc:  # an engine bug: end what is in flight, keep serving
                self._fail_all(RuntimeError(f"engine step failed: {type(exc).__name__}: {exc}"), commands)
            for output in outputs:
                self._deliver(output)
            with self._wakeup:
                self._engine_busy = self.engine.has_unfinished()
        self._fail_all(RuntimeError("ModelWorker is closed"), self._inbox)

    def _apply(self, command: _Submission | str) -> None:
        if isinstance(command, str):
            self.engine.abort(command)
            self._handles.pop(command, None)
            return
        for i, (handle, prompt, params) in enumerate(zip(command.handles, command.prompts, command.params)):
            try:
                self.engine.add_request(handle.request_id, prompt, params)
            except Exception as exc:  # refused: take back this call's other requests, report why
                for added in command.handles[:i]:
                    self.engine.abort(added.request_id)
                error = (ValueError(f"requests[{i}]: {exc}") if isinstance(exc, ValueError) else
                         RuntimeError(f"requests[{i}]: {type(exc).__name__}: {exc}"))
                _call_soon(command.loop, _resolve, command.accepted, error)
                return
        self._handles.update((h.request_id, h) for h in command.handles)
        _call_soon(command.loop, _resolve, command.accepted, None)

    def _deliver(self, output: RequestOutput) -> None:
        handle = self._handles.get(output.request_id)
        if handle is None:
            return  # aborted meanwhile
        if output.finished:
            del self._handles[output.request_id]
        if not _call_soon(handle.loop, handle.queue.put_nowait, output) and not output.finished:
            self.engine.abort(output.request_id)  # its event loop is gone: nobody will read it
            self._handles.pop(output.request_id, None)

    def _fail_all(self, error: BaseException, commands: Iterable[_Submission | str] = ()) -> None:
        """End every live request (and any not yet accepted submission among `commands`) with `error`."""
        for command in commands:
            if isinstance(command, _Submission):  # no-op for one already accepted
                _call_soon(command.loop, _resolve, command.accepted, error)
        for request_id, handle in list(self._handles.items()):
            with contextlib.suppress(Exception):  # the engine may be what is broken
                self.engine.abort(request_id)
            _call_soon(handle.loop, handle.queue.put_nowait, error)
        self._handles.clear()


def check_device(device: str) -> None:
    """ValueError, before anything loads, for a device torch cannot use here ("cuda" on a CPU build, a GPU
    index past the last one, a name torch does not know)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a device torch knows ({exc})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but torch sees no CUDA GPU here (a CPU build of torch, "
                             f"or no GPU); use 'cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    elif parsed.type != "cpu":
        raise ValueError(f"device: {device!r}: the model worker runs on 'cpu' or 'cuda[:N]'")


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Run fn(*args) on `loop` (from the engine thread); False when that loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _delta_of(output: RequestOutput) -> StreamDelta:
    return StreamDelta(output.request_id, output.text_delta, list(output.new_token_ids), output.finish_reason,
                       output.usage, output.logprobs, output.error)


def _model_type(path: str | Path) -> str | None:
    """config.json's model_type (None when it cannot be read: the loader then reports why)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
