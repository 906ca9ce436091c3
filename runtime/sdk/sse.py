"""Parsing Server-Sent Events lines into TaskEvents (the subset of the SSE format the API sends)."""

from __future__ import annotations

import json

from runtime.resources import TaskEvent


class EventParser:
    """Feed lines one at a time; `feed` returns a TaskEvent when a blank line completes one."""

    def __init__(self, task_id: str):
        self.task_id = task_id
        self._id: str | None = None
        self._type = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> TaskEvent | None:
        line = line.rstrip("\r")
        if not line:
            if self._id is None or not self._data:
                self._reset()
                return None
            event = TaskEvent(id=self._id, type=self._type, data=json.loads("\n".join(self._data)),
                              task_id=self.task_id)
            self._reset()
            return event
        if line.startswith(":"):
            return None  # keep-alive comment
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._id = value
        elif name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        return None

    def _reset(self) -> None:
        self._id, self._type, self._data = None, "message", []
