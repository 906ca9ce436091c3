"""Deleting an agent forgets its long-term memories: a new agent of the same name starts without them (over
HTTP and in-process, the SDK suite's two backends)."""

from __future__ import annotations

from runtime.sdk import ConflictError, NotFoundError
from tests.runtime.sdk.test_sdk_suite import raises

TOOLS = ["memory_write", "calculator"]


async def delete_then_recreate(sdk) -> None:
    await sdk.agents.create("helper", "You help.", tools=TOOLS)
    await sdk.memories.add("helper", "Ann's job is baker.")
    assert await sdk.agents.delete("helper") is None
    await raises(NotFoundError, sdk.agents.delete("helper"))
    await raises(ConflictError, sdk.agents.delete("assistant"))  # built in
    await sdk.agents.create("helper", "Help again.", tools=TOOLS)
    assert (await sdk.memories.list("helper")).data == []


def test_a_deleted_agents_memories_do_not_pass_to_a_new_one_of_its_name(backend):
    backend.run(delete_then_recreate)
