"""A task too large for the model's context is refused by POST /v1/tasks with one clear 422 naming `input`
(issue 17, item 3), and no task is created for it."""

from __future__ import annotations

import asyncio

from tests.runtime.api.conftest import bearer
from tests.runtime.api.support import assert_error
from tests.runtime.hardening import FINAL, ScriptModel


def test_an_oversize_task_is_refused_with_422_and_nothing_is_created(open_api):
    async def scenario():
        async with open_api(model=ScriptModel([FINAL], context_window=2000)) as api:
            key = await api.key("tenant-a")
            r = await api.client.post("/v1/tasks", headers=bearer(key), json={"input": "word " * 4_000})
            error = assert_error(r, 422, type_="invalid_request_error", field="input")
            listed = (await api.client.get("/v1/tasks", headers=bearer(key))).json()
            ok = await api.client.post("/v1/tasks", headers=bearer(key), json={"input": "a short task"})
            return error, listed, ok.status_code

    error, listed, ok_status = asyncio.run(scenario())
    assert "too large for the model's context" in error["message"]
    assert listed["data"] == [] and ok_status == 201
