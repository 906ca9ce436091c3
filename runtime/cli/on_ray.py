"""`engram serve --ray`: the runtime as a Ray Serve application (memory service, model worker and API
ingress as separate deployments, `runtime.serve`) on a local Ray instance this command starts, or on the
cluster at `--address`. Without ENGRAM_REDIS_URL it starts the embedded Redis and keeps it for the run.
The first API key is created here (before deploying) and printed once."""

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
        if await keys.count() == 0:
            return (await keys.create("default", name="first admin key", admin=True)).key
    return None


def serve_on_ray(args, settings: Settings, host: str, port: int) -> int:
    import ray
    from ray import serve

    from runtime.serve import build_app

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    redis_url, redis_server = embedded_or_url(settings.redis_url, settings.data_dir)
    settings = settings.model_copy(update={"redis_url": redis_url})
    try:
        key = asyncio.run(_first_key(settings))
        url = f"http://{host}:{port}"
        print(f"engram: deploying on Ray ({args.address or 'a local instance'}); serving {url} when ready...",
              flush=True)
        if args.address:
            ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        else:  # a local instance on loopback; its GCS picks a free port, never Redis's 6379
            ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        serve.start(http_options={"host": host, "port": port})
        fields = settings.model_dump(mode="json", exclude_none=True, exclude={"host", "port"})
        serve.run(build_app(fields), name="engram", route_prefix="/")
        if key:
            print(f"engram: created the first API key (admin, tenant 'default'); it is shown only now:\n{key}",
                  flush=True)
        print(f"engram: ready at {url} (Ray Serve; Ctrl-C stops it)", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("engram: shutting down", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
        return 0
    finally:
        if redis_server is not None:
            redis_server.stop()
