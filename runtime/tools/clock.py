"""The `current_time` tool: the current time as ISO-8601, in UTC and optionally in an IANA time zone.

It deliberately does not: parse or convert times given by the model, or keep results stable across a
re-run after a crash (reading the clock has no effect to apply once).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.tools.registry import Tool, ToolContext


class CurrentTimeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timezone: str | None = Field(None, min_length=1, max_length=64,
                                 description="IANA time zone such as 'Europe/Paris'; UTC when omitted")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value


def _utc_now() -> datetime:
    return datetime.now(UTC)


class CurrentTime(Tool):
    """Reads a clock (the system's by default; tests pass their own) returning timezone-aware datetimes."""

    name = "current_time"
    description = "The current date and time (ISO-8601), in UTC and optionally in a given IANA time zone."
    args_model = CurrentTimeArgs

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock or _utc_now

    async def run(self, args: BaseModel, ctx: ToolContext) -> dict[str, Any]:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("clock must return a timezone-aware datetime")
        utc = now.astimezone(UTC)
        result: dict[str, Any] = {"utc": utc.isoformat(timespec="seconds"), "unix": int(utc.timestamp())}
        if args.timezone is not None:
            result["timezone"] = args.timezone
            result["local"] = utc.astimezone(ZoneInfo(args.timezone)).isoformat(timespec="seconds")
        return result
