"""One JSON error shape for every error the API returns, and the mapping from the runtime's exceptions.

`{"error": {"type": ..., "message": ..., "field": ... | null, "param": ..., "code": ... | null}}`: `field`
names the offending input where there is one (`param` repeats it, as OpenAI clients read it). Unexpected
exceptions become a 500 with an error id that is also logged; a stack trace never reaches the client.

Deliberately not here: deciding what is valid (the runtime's own types and checks do).
"""

from __future__ import annotations

import logging
import secrets

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from memory_service.agent_memory.records import MemoryNotFound, MemoryValidationError
from model_worker.openai_protocol import OpenAIError
from runtime.api_keys import ApiKeyNotFound
from runtime.catalog import AgentConflict, AgentNotFound
from runtime.sessions import SessionNotFound
from runtime.tasks import ConversationBusy, IdempotencyConflict, TaskNotFound

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The one error shape, as the OpenAPI schema documents it."""

    error: ErrorDetail


_DESCRIPTIONS = {400: "the request body could not be parsed, or a model request is invalid",
                 401: "missing, invalid or revoked API key", 403: "needs an admin API key",
                 404: "not found (another tenant's id answers the same)", 409: "conflicts with the current state",
                 413: "request body over the limit", 422: "invalid request; `field` names the input",
                 429: "rate limit or concurrent-stream limit exceeded; see Retry-After",
                 500: "the model failed to generate", 503: "a dependency is unavailable"}


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI `responses` documenting these error statuses with the one error shape."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, field: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.code, self.headers = status, message, field, code, headers


def error_body(status: int, message: str, field: str | None = None, code: str | None = None, *,
               openai: bool = False) -> dict:
    """The error shape; `openai`: typed as OpenAI types its errors (every 4xx but 401 and 429 is
    "invalid_request_error", an unknown model's 404 included), for the OpenAI-compatible routes and their clients."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if openai and 400 <= status < 500 and status not in (401, 429):
        kind = "invalid_request_error"
    return {"error": {"type": kind, "message": message, "field": field, "param": field, "code": code}}


def error_response(status: int, message: str, field: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, *, openai: bool = False) -> JSONResponse:
    return JSONResponse(error_body(status, message, field, code, openai=openai), status_code=status, headers=headers)


OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions")  # bodies in OpenAI's format, errors in its types


def _openai_route(request: Request) -> bool:
    return request.url.path.endswith(OPENAI_ROUTES)


def _field_of(message: str) -> str | None:
    """The runtime's validation messages start with the field's name: 'tools: not registered ...'."""
    head = message.split(":", 1)[0]
    return head if head and ":" in message and head.replace("_", "").replace(".", "").isalnum() else None


def _loc(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or (str(loc[-1]) if loc else None)


def _describe(errors: list) -> tuple[str, str | None]:
    """(message, field) of pydantic/FastAPI validation errors: the first offending field, up to five messages."""
    field = _loc(tuple(errors[0].get("loc", ()))) if errors else None
    message = "; ".join(f"{_loc(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return message or "invalid request", field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError):
        if _openai_route(request):  # a body that is no JSON object: OpenAI answers 400, not 422
            message, _ = _describe(list(exc.errors()))
            return error_response(400, f"the request body must be a JSON object ({message})", openai=True)
        return error_response(422, *_describe(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.field, exc.code, exc.headers)

    for known in (OpenAIError, KeyError, ValueError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        app.add_exception_handler(known, _known)
    app.add_exception_handler(Exception, _unexpected)


_NOT_FOUND = (AgentNotFound, TaskNotFound, MemoryNotFound, ApiKeyNotFound, SessionNotFound)
_CONFLICT = (AgentConflict, IdempotencyConflict, ConversationBusy)


def classify(exc: BaseException) -> tuple[int, str, str | None] | None:
    """(status, message, field) for the runtime's own exceptions, None for anything unexpected. Shared by
    the HTTP handlers and the in-process SDK, so both report the same error for the same cause."""
    if isinstance(exc, ApiError):
        return exc.status, exc.message, exc.field
    if isinstance(exc, OpenAIError):
        return exc.status_code, exc.message, exc.param
    if isinstance(exc, _NOT_FOUND):
        return 404, str(exc.args[0]) if exc.args else "not found", None
    if isinstance(exc, _CONFLICT):
        return 409, str(exc), _field_of(str(exc))
    if isinstance(exc, ValidationError):
        return (422, *_describe(list(exc.errors())))
    if isinstance(exc, (MemoryValidationError, ValueError)):
        return 422, str(exc), _field_of(str(exc))
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return 503, f"a dependency is unavailable: {type(exc).__name__}: {exc}", None
    return None


async def _known(request: Request, exc: Exception):
    known = classify(exc)
    if known is None:
        return await _unexpected(request, exc)
    status, message, field = known
    code = exc.code if isinstance(exc, OpenAIError) else None  # e.g. model_not_found: OpenAI clients read it
    return error_response(status, message, field, code, headers={"Retry-After": "1"} if status == 503 else None,
                          openai=isinstance(exc, OpenAIError))


async def _unexpected(request: Request, exc: Exception):
    error_id = secrets.token_hex(6)
    log.error("error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error (id {error_id}; the server log has the details)")
