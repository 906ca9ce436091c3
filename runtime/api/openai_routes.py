"""OpenAI-compatible model endpoints, mounted from the model worker's own handlers:
`/v1/chat/completions`, `/v1/completions` (streaming as SSE ending in `data: [DONE]`, or one JSON
response) and `/v1/models`. They take the same API keys as the rest of the API.

Deliberately not here: request translation (`model_worker.openai_api` owns it).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import StreamingResponse

from model_worker.openai_api import sse_lines
from model_worker.openai_protocol import ChatCompletionResponse, CompletionResponse, ModelList
from runtime.api.errors import ApiError, error_responses
from runtime.api.guards import caller

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(caller)],
                   responses=error_responses(400, 401, 404, 413, 422, 429, 500, 503))
OpenAIBody = Annotated[dict[str, Any], Body(description="an OpenAI request body")]
_STREAM = {200: {"content": {"text/event-stream": {}}, "description": "with stream: true, SSE chunks then "
                 "data: [DONE]"}}


def _worker(request: Request):
    worker = request.app.state.service.worker
    if worker is None:
        raise ApiError(503, "this server has no model worker")
    return worker


def _reply(result):
    if hasattr(result, "__aiter__"):
        return StreamingResponse(sse_lines(result), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return result


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=_STREAM)
async def chat_completions(body: OpenAIBody, request: Request):
    return _reply(await _worker(request).chat_completions(body))


@router.post("/completions", response_model=CompletionResponse, responses=_STREAM)
async def completions(body: OpenAIBody, request: Request):
    return _reply(await _worker(request).completions(body))


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return _worker(request).models()
