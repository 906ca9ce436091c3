"""Built-in long-term memory tools: `memory_write`, `memory_search`, `memory_forget`.

They call the MemoryService on the call's context (`ctx.memory`), scoped to the calling tenant and
agent. Exactly once: `memory_write` passes the call's idempotency key to the service's idempotent write,
so re-running an unrecorded call after a crash returns the memory written the first time instead of a
second one. `memory_search` has no effect to repeat. `memory_forget` deletes at most once by nature; a
re-run finds the memory gone and reports `deleted: false`.

It deliberately does not: let the model write `summary` memories (the runtime writes those), touch
another agent's memories (forget refuses them), or catch the service's own errors (the registry turns
them into the call's ToolError).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.tools.registry import Tool, ToolContext, ToolError

MAX_MEMORY_CHARS = 8000  # the memory store's default text limit
MAX_QUERY_CHARS = 2000
MAX_SEARCH_K = 20
MAX_METADATA_ENTRIES = 16


def _service(ctx: ToolContext, tool: str) -> Any:
    if ctx.memory is None:
        raise ToolError("no memory service is configured for this session", tool=tool)
    return ctx.memory


class MemoryWriteArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_MEMORY_CHARS, description="What to remember, self-contained")
    kind: Literal["fact", "episode"] = Field("fact", description="fact: a stable fact; episode: something that "
                                                                  "happened")
    metadata: dict[str, str] | None = Field(None, max_length=MAX_METADATA_ENTRIES, description="Optional tags")


class MemorySearchArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="What to look for")
    k: int = Field(5, ge=1, le=MAX_SEARCH_K, description="How many memories to return at most")
    kinds: list[Literal["fact", "episode", "summary"]] | None = Field(None, max_length=3,
                                                                      description="Only these kinds")


class MemoryForgetArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory_id: str = Field(min_length=1, max_length=128, description="The id of the memory to delete")


class MemoryWrite(Tool):
    """Store a memory for this agent, exactly once per call."""

    name = "memory_write"
    description = "Save a fact or an episode to your long-term memory so that later sessions can find it."
    args_model = MemoryWriteArgs

    async def run(self, args: BaseModel, ctx: ToolContext) -> dict[str, Any]:
        record = await _service(ctx, self.name).write(
            ctx.tenant, ctx.agent, args.text, kind=args.kind, metadata=args.metadata,
            idempotency_key=ctx.idempotency_key, source_session=ctx.session_id, source_step=ctx.step_index)
        return {"id": record.id, "kind": record.kind, "text": record.text}


class MemorySearch(Tool):
    """Search this agent's memories by meaning."""

    name = "memory_search"
    description = "Search your long-term memory; returns the most relevant memories with their ids and scores."
    args_model = MemorySearchArgs

    async def run(self, args: BaseModel, ctx: ToolContext) -> dict[str, Any]:
        hits = await _service(ctx, self.name).search(ctx.tenant, ctx.agent, args.query, k=args.k, kinds=args.kinds)
        return {"hits": [{"id": hit.memory.id, "kind": hit.memory.kind, "text": hit.memory.text,
                          "score": round(float(hit.score), 4)} for hit in hits]}


class MemoryForget(Tool):
    """Delete one of this agent's memories."""

    name = "memory_forget"
    description = "Delete a memory of yours by id (for example one that is wrong or outdated)."
    args_model = MemoryForgetArgs

    async def run(self, args: BaseModel, ctx: ToolContext) -> dict[str, Any]:
        service = _service(ctx, self.name)
        try:
            record = await service.get(ctx.tenant, args.memory_id)
        except KeyError:  # MemoryNotFound: missing, already deleted, or another tenant's
            record = None
        if record is None:
            return {"memory_id": args.memory_id, "deleted": False}
        if record.agent != ctx.agent:
            raise ToolError(f"memory {args.memory_id!r} belongs to another agent", tool=self.name)
        try:
            await service.delete(ctx.tenant, args.memory_id)
        except KeyError:  # deleted concurrently
            return {"memory_id": args.memory_id, "deleted": False}
        return {"memory_id": args.memory_id, "deleted": True}
