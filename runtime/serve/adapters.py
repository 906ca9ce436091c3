"""What the ingress replica uses in place of in-process parts: the memory service, the model client and
the OpenAI handlers, each over a deployment handle; and the orchestrator that names the session it drives, so
the model client can pass it to the worker deployment's session-affinity router."""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any

from ray.serve.handle import DeploymentHandle

from runtime.model_client import DeltaCallback, ModelError, ModelReply
from runtime.orchestrator import Orchestrator
from runtime.serve.handles import ErrorRecord, call, streaming

# The session whose step is running ("" outside one): set by SessionOrchestrator, inherited by the tasks it starts.
current_session: contextvars.ContextVar[str] = contextvars.ContextVar("engram_current_session", default="")


class SessionOrchestrator(Orchestrator):
    """The Orchestrator, with the session it drives in `current_session` while it drives it."""

    async def run_session(self, session_id: str):
        token = current_session.set(session_id)
        try:
            return await super().run_session(session_id)
        finally:
            current_session.reset(token)


# ---- adapters used in the ingress replica --------------------------------------------------------------
class HandleMemory:
    """The MemoryService interface over the memory deployment's handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def write(self, tenant: str, agent: str, text: str, **kwargs):
        return await call(self.handle.write, tenant, agent, text, **kwargs)

    async def search(self, tenant: str, agent: str, query: str, **kwargs):
        return await call(self.handle.search, tenant, agent, query, **kwargs)

    async def get(self, tenant: str, memory_id: str):
        return await call(self.handle.get, tenant, memory_id)

    async def list(self, tenant: str, agent: str | None = None, **kwargs):
        return await call(self.handle.list, tenant, agent, **kwargs)

    async def update(self, tenant: str, memory_id: str, **kwargs):
        return await call(self.handle.update, tenant, memory_id, **kwargs)

    async def delete(self, tenant: str, memory_id: str) -> None:
        await call(self.handle.delete, tenant, memory_id)

    async def forget_agent(self, tenant: str, agent: str) -> int:
        return await call(self.handle.forget_agent, tenant, agent)

    async def ping(self) -> None:
        await call(self.handle.ping)

    def close(self) -> None:
        pass  # the deployment owns the store


class HandleModelClient:
    """The orchestrator's ModelClient over the model-worker deployment: generation there, token counting
    here with the checkpoint's own tokenizer. Each call carries `current_session` as the handle's session_id
    (what the worker deployment's SessionAffinityRouter routes on)."""

    def __init__(self, handle: DeploymentHandle, *, context_window: int, model_path: str | Path,
                 temperature: float = 0.0):
        from model_worker import load_tokenizer

        self.handle = handle
        self.context_window = context_window
        self.temperature = temperature
        self.tokenizer = load_tokenizer(model_path)

    async def complete(self, messages: list[dict], *, json_schema: dict | None, max_tokens: int,
                       seed: int | None = None, on_delta: DeltaCallback | None = None) -> ModelReply:
        parts: list[str] = []
        finish, usage = None, {}
        handle = self.handle.options(session_id=current_session.get())
        async with streaming(handle.stream_complete, messages, json_schema, max_tokens, seed,
                             self.temperature) as items:
            async for item in items:
                if "text" in item:
                    parts.append(item["text"])
                    if on_delta is not None:
                        await on_delta(item["text"])
                    continue
                finish, usage = item["finish_reason"], item["usage"]
                if finish == "error":
                    raise ModelError(item.get("error") or "the model worker failed this request")
        return ModelReply("".join(parts), finish, usage)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenizer.encode_chat(messages))


class WorkerProxy:
    """What the OpenAI routes call as `service.worker`, over the model-worker deployment."""

    def __init__(self, handle: DeploymentHandle, model_list):
        self.handle = handle
        self._models = model_list

    def models(self):
        return self._models

    async def chat_completions(self, body: Any):
        return await self._call(body, self.handle.chat_completions, self.handle.chat_completions_stream)

    async def completions(self, body: Any):
        return await self._call(body, self.handle.completions, self.handle.completions_stream)

    async def _call(self, body: Any, method, stream_method):
        if isinstance(body, dict) and body.get("stream") is True:
            return await self._stream(stream_method, body)
        result = await call(method, body)
        if isinstance(result, ErrorRecord):
            raise result.error()
        return result

    async def _stream(self, method, body: Any):
        """Waits for the worker's verdict on the request (so a bad one is a 400 before the response
        starts), then returns an async iterator of the chunks."""
        context = streaming(method, body)
        items = await context.__aenter__()
        try:
            first = await anext(items)
        except BaseException as exc:
            await context.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        if isinstance(first, ErrorRecord):
            await context.__aexit__(None, None, None)
            raise first.error()

        async def chunks():
            try:
                async for item in items:
                    if isinstance(item, ErrorRecord):
                        raise item.error()
                    yield item
            finally:
                await context.__aexit__(None, None, None)

        return chunks()


