"""Tenant isolation through every AgentMemoryStore call (SQLite and PostgreSQL): another tenant's memory id or
agent name behaves exactly like one that does not exist, and nothing one tenant does changes another's."""

from __future__ import annotations

import uuid

import pytest

from memory_service.agent_memory import MemoryNotFound


def not_found_message(call, name: str) -> str:
    """The MemoryNotFound message of `call`, with the id/name it was given blanked out."""
    with pytest.raises(MemoryNotFound) as caught:
        call()
    return str(caught.value).replace(name, "<X>")


@pytest.fixture
def two_tenants(open_store):
    store = open_store()
    mine = store.write("tenant-a", "shared-name", "tenant a private note about salaries", idempotency_key="k",
                       metadata={"owner": "a"})
    store.write("tenant-a", "a-only", "tenant a agent that b lacks")
    theirs = store.write("tenant-b", "shared-name", "tenant b note about salaries", idempotency_key="k",
                         metadata={"owner": "b"})
    return store, mine, theirs


def test_idempotency_keys_are_scoped_per_tenant(two_tenants):
    store, mine, theirs = two_tenants
    assert mine.id != theirs.id
    assert store.write("tenant-b", "shared-name", "retry", idempotency_key="k") == theirs
    assert store.write("tenant-a", "a-only", "retry", idempotency_key="k") == mine


def test_get_update_delete_of_another_tenants_id_look_like_a_missing_id(two_tenants):
    store, mine, _ = two_tenants
    missing = str(uuid.uuid4())
    calls = {
        "get": lambda memory_id: store.get("tenant-b", memory_id),
        "update": lambda memory_id: store.update("tenant-b", memory_id, text="overwritten", metadata={}),
        "delete": lambda memory_id: store.delete("tenant-b", memory_id),
    }
    for name, call in calls.items():
        assert not_found_message(lambda c=call: c(mine.id), mine.id) == \
            not_found_message(lambda c=call: c(missing), missing), name
    assert store.get("tenant-a", mine.id) == mine


def test_search_sees_only_the_callers_tenant(two_tenants):
    store, mine, theirs = two_tenants
    assert [h.memory.id for h in store.search("tenant-b", "shared-name", "salaries", k=10)] == [theirs.id]
    assert [h.memory.id for h in store.search("tenant-b", "shared-name", "salaries", k=10, hybrid=True)] == \
        [theirs.id]
    assert [h.memory.id for h in store.search("tenant-a", "shared-name", "salaries", k=10)] == [mine.id]
    assert store.search("tenant-b", "shared-name", "salaries", metadata={"owner": "a"}) == []
    assert store.search("tenant-b", "a-only", "x") == store.search("tenant-b", "never-seen", "x") == []


def test_list_sees_only_the_callers_tenant(two_tenants):
    store, mine, theirs = two_tenants
    assert [r.id for r in store.list("tenant-b").items] == [theirs.id]
    assert store.list("tenant-c").items == []
    assert not_found_message(lambda: store.list("tenant-b", "a-only"), "a-only") == \
        not_found_message(lambda: store.list("tenant-b", "never-seen"), "never-seen")
    cursor = store.list("tenant-a", limit=1).next_cursor  # a cursor is a position, not a capability
    assert all(r.tenant == "tenant-b" for r in store.list("tenant-b", cursor=cursor).items)


def test_forget_agent_of_another_tenant_changes_nothing(two_tenants):
    store, mine, theirs = two_tenants
    assert store.forget_agent("tenant-b", "a-only") == 0
    assert store.forget_agent("tenant-b", "shared-name") == 1
    assert store.get("tenant-a", mine.id) == mine
    assert [r.agent for r in store.list("tenant-a").items] == ["shared-name", "a-only"]
    assert [h.memory.id for h in store.search("tenant-a", "shared-name", "salaries")] == [mine.id]
    with pytest.raises(MemoryNotFound):
        store.get("tenant-b", theirs.id)
