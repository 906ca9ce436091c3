"""CLI commands that talk to a running server through the SDK: `tasks`, `sessions show`, `memories`.
They take --url / $ENGRAM_URL and --api-key / $ENGRAM_API_KEY."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from runtime.cli.render import EventPrinter, print_session, print_transcript, task_line
from runtime.sdk.async_client import AsyncClient, default_url
from runtime.sdk.errors import AuthenticationError, InvalidRequestError


def client_for(args) -> AsyncClient:
    url = args.url or default_url()
    key = args.api_key or os.environ.get("ENGRAM_API_KEY")
    if not key:
        raise AuthenticationError("no API key: pass --api-key or set ENGRAM_API_KEY (`engram serve` prints one on "
                                  "its first start; `engram keys create --tenant NAME` makes another)")
    return AsyncClient(url, key, max_retries=1)


async def _follow(client: AsyncClient, task_id: str, follow: bool) -> None:
    """Print the task's events: to its end with `follow`, else those so far (until a 2 s pause)."""
    printer = EventPrinter()
    stream = client.tasks.events(task_id)
    try:
        while True:
            try:
                event = await (stream.__anext__() if follow else asyncio.wait_for(stream.__anext__(), 2.0))
            except StopAsyncIteration:
                return
            except TimeoutError:
                task = await client.tasks.get(task_id)
                if not task.done:
                    print(f"(task {task_id} is still {task.status}; `engram tasks logs -f {task_id}` follows it)",
                          file=sys.stderr)
                return
            printer.show(event)
    finally:
        await stream.aclose()


async def tasks(args) -> int:
    async with client_for(args) as client:
        if args.tasks_command == "list":
            page = await client.tasks.list(status=args.status, agent=args.agent, limit=args.limit, cursor=args.cursor)
            for task in page.data:
                print(task_line(task))
            if page.next_cursor:
                print(f"(more: --cursor {page.next_cursor})")
        elif args.tasks_command == "show":
            print_transcript(await client.tasks.steps(args.task_id))
        elif args.tasks_command == "logs":
            await _follow(client, args.task_id, args.follow)
        elif args.tasks_command == "submit":
            task = await client.tasks.submit(args.input, agent=args.agent or "assistant", session_id=args.session)
            print(f"session {task.session_id}  task {task.id}", flush=True)
            if args.follow:
                await _follow(client, task.id, True)
        elif args.tasks_command == "cancel":
            before = await client.tasks.get(args.task_id)
            if before.done:
                print(f"task {before.id} already {before.status}: nothing to cancel")
            else:
                task = await client.tasks.cancel(args.task_id)
                print(f"cancellation requested for {task.id} ({task.status}); it stops at its next step")
    return 0


async def sessions(args) -> int:
    async with client_for(args) as client:
        if args.sessions_command == "show":
            print_session(await client.sessions.get(args.session_id))
        else:  # send
            task = await client.sessions.send(args.session_id, args.input)
            print(f"session {task.session_id}  task {task.id}", flush=True)
            await _follow(client, task.id, True)
    return 0


async def memories(args) -> int:
    async with client_for(args) as client:
        if args.memories_command == "search":
            for hit in await client.memories.search(args.agent, args.query, k=args.k):
                print(f"{hit.score:.3f}  {hit.memory.id}  [{hit.memory.kind}] {hit.memory.text}")
        elif args.memories_command == "add":
            try:
                metadata = json.loads(args.metadata) if args.metadata else None
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"--metadata: not JSON ({exc.msg} at character {exc.pos}): "
                                          f"{args.metadata!r}") from None
            memory = await client.memories.add(args.agent, args.text, kind=args.kind, metadata=metadata)
            print(f"added {memory.id}")
        else:
            page = await client.memories.list(args.agent, limit=args.limit, cursor=args.cursor)
            for memory in page.data:
                print(f"{memory.id}  [{memory.kind}] {memory.text}")
            if page.next_cursor:
                print(f"(more: --cursor {page.next_cursor})")
    return 0
