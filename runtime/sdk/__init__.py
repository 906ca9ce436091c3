"""The Python SDK: `Client` / `AsyncClient` over the REST API, and the same interface in-process on
`LocalRuntime` (`runtime.sdk.local`), so agent code runs with or without a server.

    from runtime.sdk import Client
    with Client("http://127.0.0.1:8080", api_key) as client:
        task = client.tasks.submit("What is 17 times 23?")
        for event in client.tasks.events(task.id):
            print(event.type, event.data)
"""

from runtime.resources import Agent, Memory, MemoryHit, MemoryPage, Session, Task, TaskEvent, TaskPage, TaskTranscript
from runtime.sdk.async_client import AsyncClient
from runtime.sdk.client import Client
from runtime.sdk.errors import (
    AuthenticationError,
    ConflictError,
    ConnectionFailed,
    EngramError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServerError,
    ServiceUnavailableError,
    TaskTimeout,
)

__all__ = [
    "Agent", "AsyncClient", "AuthenticationError", "Client", "ConflictError", "ConnectionFailed", "EngramError",
    "InvalidRequestError", "Memory", "MemoryHit", "MemoryPage", "NotFoundError", "PermissionDeniedError",
    "RateLimitError", "RequestTooLargeError", "ServerError", "ServiceUnavailableError", "Session", "Task",
    "TaskEvent", "TaskPage", "TaskTimeout", "TaskTranscript",
]
