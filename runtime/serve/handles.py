"""Calls across replicas: errors raised in another replica re-raised as themselves, OpenAIError carried as
data, streaming through handles. (The Engram row client is `engram_rows`.)"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ray.exceptions import RayTaskError

from model_worker.openai_protocol import OpenAIError


# ---- errors across replicas ----------------------------------------------------------------------------
@dataclass
class ErrorRecord:
    """An OpenAIError as data (it cannot be pickled as an exception)."""

    status_code: int
    message: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, exc: OpenAIError) -> ErrorRecord:
        return cls(exc.status_code, exc.message, exc.param, exc.code)

    def error(self) -> OpenAIError:
        return OpenAIError(self.status_code, self.message, param=self.param, code=self.code)


def unwrap(exc: BaseException) -> BaseException:
    """The exception a replica raised, from the RayTaskError a handle call raised with it."""
    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    return cause if isinstance(cause, BaseException) else exc


async def call(method, *args, **kwargs):
    """`await handle.method.remote(...)`, raising what the replica raised."""
    try:
        return await method.remote(*args, **kwargs)
    except RayTaskError as exc:
        raise unwrap(exc) from None


@contextlib.asynccontextmanager
async def streaming(method, *args, **kwargs):
    """An async iterator over a generator method's items (handle `stream=True`), raising what the replica
    raised; leaving early cancels the call in the replica (closing its generator)."""
    gen = method.options(stream=True).remote(*args, **kwargs)

    async def items():
        try:
            async for item in gen:
                yield item
        except RayTaskError as exc:
            raise unwrap(exc) from None

    it = items()
    try:
        yield it
    finally:
        await it.aclose()
        gen.cancel()  # no-op when the generator finished
