"""Typed errors of the SDK, one per error type the API answers, raised the same way by the HTTP clients
and by `LocalRuntime`, so `except NotFoundError` works against either."""

from __future__ import annotations


class EngramError(Exception):
    """Base of every SDK error: `status` (HTTP status, 0 when no answer came), `type`, `message`, `field`."""

    status = 0
    type = "error"

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message, self.field, self.retry_after = message, field, retry_after
        if status is not None:
            self.status = status


class InvalidRequestError(EngramError):
    status, type = 422, "invalid_request_error"


class AuthenticationError(EngramError):
    status, type = 401, "authentication_error"


class PermissionDeniedError(EngramError):
    status, type = 403, "permission_error"


class NotFoundError(EngramError):
    status, type = 404, "not_found_error"


class ConflictError(EngramError):
    status, type = 409, "conflict_error"


class RequestTooLargeError(EngramError):
    status, type = 413, "request_too_large"


class RateLimitError(EngramError):
    status, type = 429, "rate_limit_error"


class ServerError(EngramError):
    status, type = 500, "server_error"


class ServiceUnavailableError(ServerError):
    status, type = 503, "service_unavailable"


class ConnectionFailed(EngramError):
    """The server could not be reached (after the retries)."""

    type = "connection_error"


class TaskTimeout(EngramError):
    """`wait` gave up before the task finished (the task goes on)."""

    type = "timeout"


_BY_STATUS = {400: InvalidRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
              409: ConflictError, 413: RequestTooLargeError, 422: InvalidRequestError, 429: RateLimitError,
              503: ServiceUnavailableError}


def error_for_status(status: int, message: str, field: str | None = None,
                     retry_after: float | None = None) -> EngramError:
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else InvalidRequestError)
    return cls(message, status=status, field=field, retry_after=retry_after)
