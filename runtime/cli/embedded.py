"""CLI commands that run the runtime in this process on the embedded defaults (or the ENGRAM_* settings):
`run`, `resume`, `show`, `keys` and `serve --embedded` (plain `serve` hands over to `on_ray`). Commands that
only read or write Redis (`show`, `keys`, and `resume`'s check of the id) never load a model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator

from pydantic import ValidationError

from runtime.agents import DEFAULT_AGENT
from runtime.api.errors import classify
from runtime.api_keys import ApiKeyStore
from runtime.catalog import AgentCatalog, AgentNotFound
from runtime.cli.render import EventPrinter, print_session, print_transcript
from runtime.redis_server import embedded_or_url
from runtime.resources import TaskCreate
from runtime.sdk.errors import ConflictError, NotFoundError, error_for_status
from runtime.sessions import SessionNotFound, SessionStore
from runtime.settings import Settings
from runtime.tasks import ConversationBusy, ConversationNotFound, TaskBoard


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[SessionStore]:
    """The session store alone (Redis: the configured one, or the embedded server under the data dir)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url, server = embedded_or_url(settings.redis_url, settings.data_dir)
    store = SessionStore(url, key_prefix=settings.key_prefix, retry_attempts=2)
    try:
        yield store
    finally:
        await store.close()
        if server is not None:
            server.stop()


@contextlib.contextmanager
def progress(what: str):
    """'what... 3s' updated on a terminal while a blocking step (model loading) runs; one line otherwise."""
    out, done, started = sys.stderr, threading.Event(), time.monotonic()
    if not out.isatty():
        print(f"{what}...", file=out, flush=True)

    def tick() -> None:
        while not done.wait(0.5):
            out.write(f"\r{what}... {time.monotonic() - started:.0f}s")
            out.flush()

    ticker = threading.Thread(target=tick, daemon=True) if out.isatty() else None
    if ticker:
        ticker.start()
    try:
        yield
    finally:
        done.set()
        if ticker:
            ticker.join()
            out.write(f"\r{what}: done in {time.monotonic() - started:.1f}s\n")
            out.flush()


async def _started_runtime(settings: Settings, tenant: str):
    from runtime.local import LocalRuntime

    runtime = LocalRuntime(settings, tenant=tenant)
    with progress("starting the runtime (Redis, agent memory, model)"):
        await runtime.start()
    return runtime


async def _drive_when_free(runtime, task_id: str) -> None:
    """Run the task here; while another process holds its lease (it runs the task, or died less than a lease
    ago), wait and take over once the lease is free. Returns when the task is over, whoever finished it."""
    from runtime.sessions import LeaseLost, SessionFinished

    told = False
    while True:
        try:
            await runtime.orchestrator.run_session(task_id)
            return
        except SessionFinished:
            return
        except LeaseLost:
            if not told:
                print(f"task {task_id} is held by another process: following it; this one takes over if that "
                      f"one has died (its lease runs out within {runtime.settings.lease_ms / 1000:g}s)",
                      file=sys.stderr, flush=True)
                told = True
            await asyncio.sleep(min(1.0, runtime.settings.lease_ms / 4000))


async def _follow(runtime, task_id: str) -> None:
    """Drive the task here and print its events as they happen; an error of the driving (model, database)
    ends the following at once, not after the task it stopped."""
    printer = EventPrinter()

    async def show() -> None:
        async for event in runtime.tasks.events(task_id):
            printer.show(event)

    driver, shower = asyncio.create_task(_drive_when_free(runtime, task_id)), asyncio.create_task(show())
    try:
        done, _ = await asyncio.wait({driver, shower}, return_when=asyncio.FIRST_EXCEPTION)
        for finished in done:
            finished.result()
    finally:
        for job in (driver, shower):
            job.cancel()
        await asyncio.gather(driver, shower, return_exceptions=True)


async def _check_names(settings: Settings, args) -> None:
    """An unknown agent or session is one error line before the model loads (seconds), not after it."""
    async with open_store(settings) as store:
        try:
            catalog = AgentCatalog(store.redis, key_prefix=settings.key_prefix, builtin=[DEFAULT_AGENT])
            await catalog.get(args.tenant, args.agent)
            if args.session is not None:
                await TaskBoard(store, None, key_prefix=settings.key_prefix).conversation_agent(args.tenant,
                                                                                                args.session)
        except (AgentNotFound, ConversationNotFound) as exc:
            raise NotFoundError(str(exc.args[0])) from None


async def run(args) -> int:
    try:  # the API's checks of a task (size, blank input, ids), before anything starts
        TaskCreate(agent=args.agent, input=args.task, session_id=args.session)
    except ValidationError as exc:
        raise error_for_status(*classify(exc)) from None
    settings = Settings()
    if args.agent != DEFAULT_AGENT.name or args.session is not None:  # the built-in agent alone is always there
        await _check_names(settings, args)
    runtime = await _started_runtime(settings, args.tenant)
    try:
        try:
            task, _ = await runtime.service.tasks.submit(args.tenant, args.agent, args.task,
                                                         conversation_id=args.session)
        except ConversationNotFound as exc:
            raise NotFoundError(str(exc.args[0])) from None
        except ConversationBusy as exc:
            raise ConflictError(f"{exc}; if the process running it died, `engram resume "
                                f"{args.session}` finishes it") from None
        print(f"session {task.session_id}  task {task.id}", flush=True)
        worker = runtime.worker
        print(_model_note(settings, worker.max_sequence_tokens if worker is not None else None), flush=True)
        await _follow(runtime, task.id)
        done = await runtime.tasks.get(task.id)
        steps = f"{done.step_count} step{'' if done.step_count == 1 else 's'}"
        print(f"task {done.status} in {steps}. Show it: engram show {done.id}  "
              f"Continue: engram run --session {done.session_id} \"...\"")
        return 0 if done.status == "completed" or not args.strict else 1
    finally:
        await runtime.close()


async def _unfinished(store: SessionStore, settings: Settings, ident: str) -> tuple[str, list[str]]:
    """(tenant, task ids to resume) for a task or session id (NotFoundError before anything else is loaded)."""
    board = TaskBoard(store, None, key_prefix=settings.key_prefix)
    try:
        state = await store.state(ident)
        return state.tenant, [] if state.finished else [ident]
    except (SessionNotFound, ValueError):
        pass
    tenant = (await store.redis.hget(f"{settings.key_prefix}:conversation:{ident}", "tenant"))
    if tenant is None:
        raise NotFoundError(f"no task or session {ident!r}")
    session = await board.conversation(tenant, ident)
    return tenant, [task.id for task in session.tasks if not task.done]


async def resume(args) -> int:
    settings = Settings()
    async with open_store(settings) as store:
        tenant, pending = await _unfinished(store, settings, args.id)
    if not pending:
        print(f"{args.id}: nothing left to run (finished)")
        return 0
    runtime = await _started_runtime(settings, tenant)
    try:
        for task_id in pending:
            print(f"resuming task {task_id}", flush=True)
            await _follow(runtime, task_id)
        return 0
    finally:
        await runtime.close()


async def show(args) -> int:
    settings = Settings()
    async with open_store(settings) as store:
        board = TaskBoard(store, None, key_prefix=settings.key_prefix)
        try:
            state = await store.state(args.id)
            print_transcript(await board.transcript(state.tenant, args.id))
            return 0
        except (SessionNotFound, ValueError):
            pass
        tenant = await store.redis.hget(f"{settings.key_prefix}:conversation:{args.id}", "tenant")
        try:
            print_session(await board.conversation(tenant or "", args.id))
        except ConversationNotFound:
            raise NotFoundError(f"no task or session {args.id!r}") from None
        return 0


async def keys(args) -> int:
    settings = Settings()
    async with open_store(settings) as store:
        store_keys = ApiKeyStore(store.redis, key_prefix=settings.key_prefix)
        if args.keys_command == "create":
            key = await store_keys.create(args.tenant, name=args.name, admin=args.admin)
            print(f"key id {key.id} (tenant {key.tenant}{', admin' if key.admin else ''}); the key, shown once:")
            print(key.key)
        elif args.keys_command == "revoke":
            from runtime.api_keys import ApiKeyNotFound

            try:
                key = await store_keys.revoke(args.key_id)
            except ApiKeyNotFound as exc:
                raise NotFoundError(str(exc.args[0])) from None
            print(f"revoked {key.id} (tenant {key.tenant})")
        else:
            for key in await store_keys.list(args.tenant):
                state = "revoked" if key.revoked_ms else "active"
                print(f"{key.id}  {key.tenant:<16}  {state:<7}  {'admin' if key.admin else 'user':<5}  {key.name}")
    return 0


def serve(args) -> int:
    import uvicorn

    from runtime.api import create_app

    settings = Settings()
    host, port = args.host or settings.host, args.port or settings.port
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            print(f"error: cannot listen on {host}:{port} ({exc.strerror}); choose another with --port",
                  file=sys.stderr)
            return 2
    if args.embedded and args.address:
        print("error: --address joins a Ray cluster; --embedded runs without Ray", file=sys.stderr)
        return 2
    if not args.embedded:  # Ray Serve, the default (--ray says the same)
        from runtime.cli.on_ray import serve_on_ray

        return serve_on_ray(args, settings, host, port)
    url = f"http://{host}:{port}"
    print(f"engram: serving {url} (API docs at {url}/docs); starting the runtime...", flush=True)

    failed: list[BaseException] = []  # the runtime's start failed: its error is our one line, not uvicorn's traceback
    quiet = _QuietAfter(failed)
    logging.getLogger("uvicorn.error").addFilter(quiet)
    app = create_app(settings, on_new_key=announce_first_key, on_start_failed=failed.append,
                     on_ready=lambda: print(f"engram: ready at {url}", flush=True))
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    except SystemExit:
        if failed:
            raise failed[0] from None
        raise
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
    return 0


class _QuietAfter(logging.Filter):
    """Drops the server's log records once `failed` holds the error that stopped the start (uvicorn would log it
    as a traceback and 'Application startup failed')."""

    def __init__(self, failed: list[BaseException]) -> None:
        super().__init__()
        self.failed = failed

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.failed


def announce_first_key(key: str) -> None:
    print(f"engram: created the first API key (admin, tenant 'default'); it is shown only now:\n{key}", flush=True)


def _model_note(settings: Settings, context_window: int | None = None) -> str:
    """One line on what the served model can do (the demo models are not general assistants); for a checkpoint
    of the user's, its context window, which the KV cache's budget may cap below the model's own."""
    from runtime.local import trained_demo_model

    if settings.model_path is not None:
        if context_window is None:
            return f"model: {settings.model_path}"
        return (f"model: {settings.model_path} (context window {context_window} tokens, prompt and reply: the "
                f"model's own or what the KV cache holds, ENGRAM_CACHE_BUDGET_MIB={settings.cache_budget_mib} with "
                f"ENGRAM_KV_CACHE_DTYPE={settings.kv_cache_dtype}, whichever is less)")
    if trained_demo_model() is not None:
        return ("model: the demo model, a small model we trained on synthetic traces: it does arithmetic with the "
                "calculator, saves results and facts and recalls them, says when it has none (it gets one or two "
                "tasks in ten wrong); "
                "nothing else (ENGRAM_MODEL_PATH serves a real checkpoint)")
    return ("model: the demo checkpoint with random weights: its actions are valid but meaningless "
            "(ENGRAM_MODEL_PATH serves a real checkpoint)")
