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
from tests.random_model import RANDOM_MODEL_BOUNDS
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


def deploy_config_app(http_port: int, redis_url: str, prefix: str, model_dir: Path, data_dir: Path,  # noqa: F811
                      deployments: dict[str, dict] | None = None, args: dict | None = None) -> ServeServer:
    """The config's application deployed on the connected Ray (Serve started on http_port), its args pointed at
    the test's Redis/prefix/model/data dir and updated with `args`; `deployments`: {name: options} replacing the
    config's options of those deployments (or added, for deployments the config does not list, such as
    EngramShard{i}). Waits until it runs; its own first API key must exist by then."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    config = load_config()
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    (app,) = config["applications"]
    app["args"].update(redis_url=redis_url, key_prefix=prefix, model_path=str(model_dir),
                       database_url=f"sqlite:///{data_dir / 'memory.sqlite3'}", data_dir=str(data_dir),
                       embedder="hashing", lease_ms=2000, heartbeat_s=0.5, **RANDOM_MODEL_BOUNDS, **(args or {}))
    listed = {options["name"] for options in app["deployments"]}
    app["deployments"] += [{"name": name} for name in (deployments or {}) if name not in listed]
    for options in app["deployments"]:
        options.update((deployments or {}).get(options["name"], {}), name=options["name"])
        if "num_replicas" in options:
            options.pop("autoscaling_config", None)
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
    before, api_key = asyncio.run(_create_key(redis_url, prefix))
    assert before == 1, f"the ingress should have created exactly the first API key, found {before}"
    return ServeServer(f"http://127.0.0.1:{http_port}", api_key, prefix, app["name"])


@pytest.fixture(scope="module")
def deployed(ray_serve, redis_url, serve_prefix, serve_model_dir, tmp_path_factory) -> ServeServer:  # noqa: F811
    """The config's application deployed on the test's Ray."""
    return deploy_config_app(ray_serve, redis_url, serve_prefix, serve_model_dir, tmp_path_factory.mktemp("serve-data"))


def replica_probe(app: str, deployment: str, probe) -> dict[str, object]:
    """{replica actor name: probe(replica)} over a deployment's live replicas (probe runs in the replica's
    process, e.g. to get its pid or node id); replicas that are going away are left out."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"{app}#{deployment}#" in a["name"]]
    found = {}
    for name in names:
        try:
            found[name] = ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(probe), timeout=10)
        except Exception:
            continue
    return found


def start_until_one_is_mid_run(server: ServeServer, agent: str) -> tuple[list[str], str]:
    """Submit tasks of a new agent one by one until one has committed an action step and goes on (a random
    model may end a task at once), then one more; -> (all task ids, the one that is mid-run)."""
    import httpx

    from tests.e2e.test_http_server import KILL_INPUTS, create_agent, read_events, submit

    tasks = []
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"},
                      timeout=30.0) as http:
        create_agent(http, agent, max_steps=4, max_tokens_per_step=160)
        for text in KILL_INPUTS:
            tasks.append(submit(http, agent, text)["id"])
            before = read_events(server, tasks[-1],
                                 stop_when=lambda e: e.type == "step_committed" and e.data.get("kind") == "action")
            if before and not before[-1].terminal:
                mid_run = tasks[-1]
                tasks.append(submit(http, agent, "Add 5 and 9, then remember the sum.")["id"])  # in flight too
                return tasks, mid_run
    pytest.fail("no task committed an action step before ending")


def assert_tasks_end_once_each(server: ServeServer, tasks: list[str], timeout_s: float = 150.0) -> None:
    """Every task reaches a terminal status (the API may be unreachable for a while meanwhile), with a gap-free
    step log and each step committed exactly once in its event stream."""
    import httpx

    from runtime.sdk import Client
    from tests.e2e.test_http_server import TERMINAL_STATUSES, assert_gap_free, committed_indexes, read_events

    def status(task_id: str) -> str | None:
        try:
            response = httpx.get(f"{server.url}/v1/tasks/{task_id}", timeout=10.0,
                                 headers={"Authorization": f"Bearer {server.api_key}"})
        except httpx.TransportError:
            return None
        return response.json()["status"] if response.status_code == 200 else None

    deadline = time.monotonic() + timeout_s
    for task_id in tasks:
        while status(task_id) not in TERMINAL_STATUSES:
            assert time.monotonic() < deadline, f"task {task_id} did not end within {timeout_s:.0f}s"
            time.sleep(0.5)
    with Client(server.url, server.api_key) as client:
        for task_id in tasks:
            transcript = client.tasks.steps(task_id)
            assert_gap_free(transcript)
            assert committed_indexes(read_events(server, task_id)) == list(range(transcript.step_count)), task_id
