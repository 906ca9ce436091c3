"""How the orchestrator asks a model for its next action.

`ModelClient` is the narrow interface the loop needs: complete a chat under a JSON schema, streaming
text deltas, and count tokens to manage the context window. `WorkerModelClient` implements it over
our `ModelWorker` (in-process now, a Ray handle later); an external OpenAI-compatible model would be
another implementation. Nothing here knows about sessions or tools.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from model_worker.engine.sampling import SamplingParams
from model_worker.worker import GenerateRequest, ModelWorker

DeltaCallback = Callable[[str], Awaitable[None]]


class ModelError(RuntimeError):
    """The model could not produce a reply (worker failure, not a parse problem)."""


@dataclass
class ModelReply:
    text: str
    finish_reason: str | None
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, cached_tokens


class ModelClient(Protocol):
    context_window: int

    async def complete(self, messages: list[dict], *, json_schema: dict | None, max_tokens: int,
                       seed: int | None = None, on_delta: DeltaCallback | None = None) -> ModelReply: ...

    def count_tokens(self, messages: list[dict]) -> int: ...


class WorkerModelClient:
    """ModelClient over a ModelWorker: structured decoding keeps actions valid even from a weak model."""

    def __init__(self, worker: ModelWorker, *, temperature: float = 0.0):
        worker.text_tokenizer("an agent (chat prompts, structured actions)")  # ValueError now, not per step
        self.worker = worker
        self.temperature = temperature
        self.context_window = worker.max_sequence_tokens

    async def complete(self, messages: list[dict], *, json_schema: dict | None, max_tokens: int,
                       seed: int | None = None, on_delta: DeltaCallback | None = None) -> ModelReply:
        params = SamplingParams(max_tokens=max_tokens, temperature=self.temperature, seed=seed,
                                json_schema=json_schema)
        request = GenerateRequest(messages=messages, params=params)
        parts: list[str] = []
        finish, usage = None, {}
        async for delta in self.worker.stream(request):
            if delta.text:
                parts.append(delta.text)
                if on_delta is not None:
                    await on_delta(delta.text)
            if delta.finish_reason is not None:
                finish = delta.finish_reason
                usage = _usage_dict(delta.usage)
                if finish == "error":
                    raise ModelError(delta.error or "the model worker failed this request")
        return ModelReply("".join(parts), finish, usage)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.worker.text_tokenizer("counting prompt tokens").encode_chat(messages))


def _usage_dict(usage) -> dict:
    if usage is None:
        return {}
    if isinstance(usage, dict):
        return usage
    return {k: getattr(usage, k) for k in ("prompt_tokens", "completion_tokens", "cached_tokens") if hasattr(usage, k)}
