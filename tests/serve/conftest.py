"""Ray Serve fixtures: one local Ray instance per test module (2 CPUs, no dashboard, 127.0.0.1), Serve's HTTP
proxy on a free port, and the application of `deploy/serve_config.yaml` deployed through Serve's own config
path (the controller runs `import_path` with the config's args, as `serve run`/`serve deploy` do), with the
args pointed at the shared test Redis under a key prefix of this module's own (deleted afterwards), a SQLite
file under tmp, and the tiny random checkpoint.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.model_worker.engine.engine_fixtures import tiny_checkpoint
from tests.runtime.conftest import delete_keys, redis_url  # noqa: F401  (the shared-Redis fixture)

REPO = Path(__file__).resolve().parents[2]
CONFIG_PATH = REPO / "deploy" / "serve_config.yaml"
DEPLOY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_config() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text())


@dataclass
class ServeServer:
    """What the HTTP end-to-end scenario needs of a server: its base URL and an API key."""

    url: str
    api_key: str
    key_prefix: str
    app_name: str


@pytest.fixture(scope="module")
def serve_prefix(redis_url) -> Iterator[str]:  # noqa: F811
    prefix = f"test-serve-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_keys(redis_url, prefix)


@pytest.fixture(scope="module")
def serve_model_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve-model") / "model")


@pytest.fixture(scope="module")
def ray_serve() -> Iterator[int]:
    """A local Ray instance with Serve started; yields the HTTP proxy's port."""
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             namespace=f"engram-test-{uuid.uuid4().hex[:8]}", object_store_memory=256 * 2**20,
             log_to_driver=False)
    try:
        gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
        assert gcs_port != 6379, "Ray took Redis's port"
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


async def _create_key(url: str, prefix: str) -> tuple[int, str]:
    import redis.asyncio as aioredis

    from runtime.api_keys import ApiKeyStore

    client = aioredis.Redis.from_url(url)
    try:
        keys = ApiKeyStore(client, key_prefix=prefix)
        before = await keys.count()
        key = await keys.create("default", name="serve tests", admin=True)
        return before, key.key
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def deployed(ray_serve, redis_url, serve_prefix, serve_model_dir, tmp_path_factory) -> ServeServer:  # noqa: F811
    """The config's application deployed on the test's Ray; its own first API key must exist by then."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    data_dir = tmp_path_factory.mktemp("serve-data")
    config = load_config()
    config["http_options"] = {"host": "127.0.0.1", "port": ray_serve}
    (app,) = config["applications"]
    app["args"].update(redis_url=redis_url, key_prefix=serve_prefix, model_path=str(serve_model_dir),
                       database_url=f"sqlite:///{data_dir / 'memory.sqlite3'}", data_dir=str(data_dir),
                       embedder="hashing", lease_ms=2000, heartbeat_s=0.5)
    schema = ServeDeploySchema.model_validate(config)
    _get_global_client().deploy_apps(schema)  # what `serve run config.yaml` / `serve deploy` do
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while True:
        status = serve.status().applications.get(app["name"])
        if status is not None and status.status == ApplicationStatus.RUNNING:
            break
        if status is not None and status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise AssertionError(f"the application failed to deploy: {status}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the application was not running within {DEPLOY_TIMEOUT_S:.0f}s: {status}")
        time.sleep(0.5)
    before, api_key = asyncio.run(_create_key(redis_url, serve_prefix))
    assert before == 1, f"the ingress should have created exactly the first API key, found {before}"
    return ServeServer(f"http://127.0.0.1:{ray_serve}", api_key, serve_prefix, app["name"])
