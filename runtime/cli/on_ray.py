"""`engram serve` (the default mode; `--ray` is an alias): the runtime as a Ray Serve application (memory
service, model worker and API ingress as separate deployments, `runtime.serve`) on a local Ray instance this
command starts, or on the cluster at `--address`. Without ENGRAM_REDIS_URL it starts the embedded Redis and
keeps it for the run. The first API key is created and printed once, before deploying."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading

from runtime.api_keys import ApiKeyStore
from runtime.cli.embedded import open_store
from runtime.redis_server import embedded_or_url
from runtime.settings import Settings


async def _first_key(settings: Settings) -> str | None:
    async with open_store(settings) as store:
        keys = ApiKeyStore(store.redis, key_prefix=settings.key_prefix)
        key = await keys.create_first("default", name="first admin key", admin=True)
    return key.key if key is not None else None


def _shared_state_warnings(args, settings: Settings) -> list[str]:
    """What replicas on other nodes of a joined cluster cannot reach: this machine's embedded Redis and its
    SQLite file (they would each see their own, or none)."""
    if not args.address:
        return []
    out = []
    if not settings.redis_url:
        out.append("ENGRAM_REDIS_URL is unset, so the sessions live in an embedded Redis on this machine's loopback")
    if not settings.database_url:
        out.append("ENGRAM_DATABASE_URL is unset, so agent memory is a SQLite file on each replica's own node")
    return [f"engram: warning: {line}; replicas on other nodes of {args.address} cannot share it: set it to a "
            f"server every node reaches" for line in out]


def serve_on_ray(args, settings: Settings, host: str, port: int) -> int:
    from runtime import serve as on_serve
    from runtime.cli.embedded import announce_first_key, progress

    for warning in _shared_state_warnings(args, settings):
        print(warning, file=sys.stderr, flush=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    redis_url, redis_server = embedded_or_url(settings.redis_url, settings.data_dir)
    settings = settings.model_copy(update={"redis_url": redis_url})
    try:
        key = asyncio.run(_first_key(settings))
        if key:  # printed at once: a deploy that fails or is interrupted must not take the only admin key with it
            announce_first_key(key)
        url = f"http://{host}:{port}"
        with progress(f"engram: deploying on Ray ({args.address or 'a local instance'}); serving {url} when ready"):
            on_serve.deploy(settings, host=host, port=port, address=args.address)
        print(f"engram: ready at {url} (Ray Serve; Ctrl-C stops it)", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("engram: shutting down", file=sys.stderr)
        on_serve.shutdown(args.address)
        return 0
    finally:
        if redis_server is not None:
            redis_server.stop()
