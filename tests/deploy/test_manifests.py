"""The deployment manifests (deploy/): the KubeRay RayService, the compose file and the Dockerfile.

Static checks, no cluster or Docker needed: the RayService serves the same Serve application as
deploy/serve_config.yaml (apart from the args that come from a Secret through ENGRAM_* variables), every
reference inside the manifests resolves, and the image is built the way the project installs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
COMPOSE = ROOT / "deploy" / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"

# Builder args that the RayService takes from the environment (a Secret) instead of serveConfigV2.
ENV_ARGS = ("redis_url", "database_url")
REDIS_PORT = 6379


def env_name(field: str) -> str:
    return Settings.model_config["env_prefix"] + field.upper()


# ---- KubeRay RayService ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    docs = [doc for doc in yaml.safe_load_all(RAYSERVICE.read_text()) if doc is not None]
    assert all(isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc for doc in docs)
    return docs


def one(docs: list[dict], kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {RAYSERVICE.name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rayservice(manifests) -> dict:
    service = one(manifests, "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    return service


@pytest.fixture(scope="module")
def secret(manifests) -> dict:
    secret = one(manifests, "Secret")
    assert secret["apiVersion"] == "v1"
    return secret


@pytest.fixture(scope="module")
def serve_v2(rayservice) -> dict:
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string (a block scalar)"
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def app_named(config: dict, name: str) -> dict:
    apps = [app for app in config["applications"] if app["name"] == name]
    assert len(apps) == 1, f"application {name!r}: found {len(apps)}"
    return apps[0]


def groups(rayservice: dict) -> list[tuple[str, dict]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = [("head", cluster["headGroupSpec"])]
    out += [(group["groupName"], group) for group in cluster["workerGroupSpecs"]]
    return out


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_both_serve_configs_validate(serve_v2, serve_config):
    ServeDeploySchema.model_validate(serve_config)
    schema = ServeDeploySchema.model_validate(serve_v2)
    # Without http_options, Serve listens on 0.0.0.0:8000, which KubeRay's serve Service targets.
    assert "http_options" not in serve_v2 or serve_v2["http_options"].get("port") == schema.http_options.port
    assert schema.http_options.host == "0.0.0.0"


def test_rayservice_embeds_the_serve_config_application(serve_v2, serve_config):
    assert [app["name"] for app in serve_v2["applications"]] == [app["name"] for app in serve_config["applications"]]
    for expected in serve_config["applications"]:
        app = app_named(serve_v2, expected["name"])
        for key in ("import_path", "route_prefix"):
            assert app.get(key) == expected.get(key), key
        # Deployments: the same names in the same order, each with exactly the same options.
        assert [d["name"] for d in app["deployments"]] == [d["name"] for d in expected["deployments"]]
        assert app["deployments"] == expected["deployments"]
        # Args: the same, except the ones the environment provides, which are absent here.
        args = app.get("args") or {}
        expected_args = expected.get("args") or {}
        assert not set(ENV_ARGS) & set(args), f"{ENV_ARGS} come from the Secret, not serveConfigV2"
        assert args == {k: v for k, v in expected_args.items() if k not in ENV_ARGS}
        assert set(expected.keys()) == set(app.keys()), "a top-level application key differs"


def test_env_args_are_settings_read_from_the_environment(serve_v2, monkeypatch):
    """What replaces the omitted args: Settings fields, read from ENGRAM_* variables with the rest from args."""
    args = app_named(serve_v2, "engram")["args"]
    values = {"redis_url": "redis://redis.example:6379/0", "database_url": "postgresql+psycopg://u:p@db/engram"}
    assert set(values) == set(ENV_ARGS)
    for field, value in values.items():
        assert field in Settings.model_fields
        monkeypatch.setenv(env_name(field), value)
    settings = Settings(**args)
    assert settings.redis_url == values["redis_url"]
    assert settings.database_url == values["database_url"]
    assert str(settings.model_path) == args["model_path"]
    # build_app hands the ingress its settings with exclude_unset: values from the environment are kept.
    dumped = settings.model_dump(mode="json", exclude_unset=True)
    assert dumped["redis_url"] == values["redis_url"] and dumped["database_url"] == values["database_url"]


def test_env_comes_from_the_secret_in_every_ray_pod(rayservice, secret):
    keys = set(secret.get("stringData") or {}) | set(secret.get("data") or {})
    for group_name, group in groups(rayservice):
        for container in containers(group):
            env = {item["name"]: item for item in container.get("env", [])}
            for field in ENV_ARGS:
                name = env_name(field)
                assert name in env, f"{group_name}/{container['name']}: {name} missing"
                ref = env[name].get("valueFrom", {}).get("secretKeyRef")
                assert ref, f"{group_name}/{container['name']}: {name} must come from a Secret"
                assert ref["name"] == secret["metadata"]["name"]
                assert ref["key"] in keys, f"{ref['key']} is not a key of the Secret"


def test_secret_placeholders(secret):
    data = secret["stringData"]
    urls = [urlsplit(value) for value in data.values()]
    assert any(url.scheme == "redis" for url in urls)
    assert any(url.scheme.startswith("postgresql") for url in urls)


def test_head_group(rayservice):
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings"
    gcs_port = int(params["port"])
    assert gcs_port != REDIS_PORT, "the Ray GCS must not take Redis's port"
    assert float(params["num-cpus"]) < 1, "Serve replicas belong on the workers"
    assert "num-gpus" not in params or float(params["num-gpus"]) == 0
    assert params.get("dashboard-host") == "0.0.0.0"
    (container,) = containers(head)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    # KubeRay takes the head Service's and the workers' GCS port from the container port named gcs-server.
    assert ports["gcs-server"] == gcs_port
    assert REDIS_PORT not in ports.values()
    assert "nvidia.com/gpu" not in (container.get("resources", {}).get("limits") or {})


def test_serve_port_matches_the_proxies(rayservice, serve_v2):
    port = ServeDeploySchema.model_validate(serve_v2).http_options.port
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    (container,) = containers(head)
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["serve"] == port


def test_worker_groups(rayservice):
    workers = {group["groupName"]: group for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gpu = [g for g in workers.values() if float(g["rayStartParams"].get("num-gpus", "0")) >= 1]
    cpu = [g for g in workers.values() if float(g["rayStartParams"].get("num-gpus", "0")) == 0]
    assert len(gpu) == 1 and len(cpu) >= 1
    for group in workers.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus = float(group["rayStartParams"].get("num-gpus", "0"))
        for container in containers(group):
            limit = int((container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))
            assert limit == gpus, f"{group['groupName']}: num-gpus and the nvidia.com/gpu limit disagree"


def test_images_and_volumes(manifests, rayservice, serve_v2):
    claims = {doc["metadata"]["name"] for doc in manifests if doc["kind"] == "PersistentVolumeClaim"}
    model_path = app_named(serve_v2, "engram")["args"]["model_path"]
    for group_name, group in groups(rayservice):
        spec = group["template"]["spec"]
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in spec["containers"]:
            assert container["image"].split(":")[0] == "engram-runtime"
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert all(name in volumes for name in mounts.values())
            assert model_path in mounts, f"{group_name}: the checkpoint at {model_path} is not mounted"


# ---- docker compose -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def argv(command) -> list[str]:
    if isinstance(command, str):
        return shlex.split(command)
    return [part for item in command for part in shlex.split(item)]


def test_compose_services(compose):
    services = compose["services"]
    assert {"redis", "postgres", "ray-head", "app"} <= set(services)
    redis_cmd = argv(services["redis"]["command"])
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[-1] == "/data" for v in services["redis"]["volumes"])
    assert "pg_isready" in " ".join(argv(services["postgres"]["healthcheck"]["test"]))
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    declared = set(compose.get("volumes") or {})
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith((".", "/")) or source in declared, f"volume {source} not declared"


def test_compose_app(compose):
    services = compose["services"]
    app = services["app"]
    depends = app["depends_on"]
    for name in ("redis", "postgres"):
        assert depends[name]["condition"] == "service_healthy"
        assert "healthcheck" in services[name]
    env = env_of(app)
    redis = urlsplit(env["ENGRAM_REDIS_URL"])
    assert redis.scheme == "redis" and redis.hostname == "redis" and (redis.port or REDIS_PORT) == REDIS_PORT
    db = urlsplit(env["ENGRAM_DATABASE_URL"])
    pg = env_of(services["postgres"])
    assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres"
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    assert any(str(port).split(":")[-1] == "8080" for port in app["ports"])
    assert argv(app["command"])[argv(app["command"]).index("--port") + 1] == "8080"
    build = app["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()


def test_compose_ray_head(compose):
    head = compose["services"]["ray-head"]
    assert head["image"] == compose["services"]["app"]["image"]
    words = argv(head["command"])
    assert "--head" in words
    ports = [w.split("=", 1)[1] for w in words if w.startswith("--port=")]
    assert ports and all(int(p) != REDIS_PORT for p in ports)
    assert env_of(head)["ENGRAM_REDIS_URL"] == env_of(compose["services"]["app"])["ENGRAM_REDIS_URL"]


# ---- Dockerfile -----------------------------------------------------------------------------------------
def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments and blank lines dropped, `\\` continuations joined
    (comment lines inside a continuation are skipped, as Docker does)."""
    out: list[tuple[str, str]] = []
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or (line.startswith("#")):
            continue
        if line.endswith("\\"):
            current.append(line[:-1].strip())
            continue
        current.append(line)
        joined = " ".join(part for part in current if part)
        current = []
        instruction, _, rest = joined.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    assert not current, "the Dockerfile ends inside a continuation"
    return out


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), value)


def test_dockerfile_parser():
    text = "# c\nFROM a:1\nRUN x \\\n  # inside\n  && y\nCMD [\"z\"]\n"
    assert parse_dockerfile(text) == [("FROM", "a:1"), ("RUN", "x && y"), ("CMD", '["z"]')]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    steps = parse_dockerfile(DOCKERFILE.read_text())
    variables: dict[str, str] = {}
    expanded = []
    for instruction, args in steps:
        if instruction == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            variables[name.strip()] = default.strip().strip('"')
        expanded.append((instruction, expand(args, variables)))
    return expanded


def test_dockerfile_base_and_install_order(dockerfile):
    froms = [args for instruction, args in dockerfile if instruction == "FROM"]
    assert froms and froms[-1].split()[0].startswith("python:3.11")
    runs = [(i, args) for i, (instruction, args) in enumerate(dockerfile) if instruction == "RUN"]
    torch = [i for i, args in runs if re.search(r"pip install\b.*\btorch==2\.13\.0\b", args)]
    project = [i for i, args in runs if re.search(r"pip install\s+(-e\s+|--editable\s+)?\.(\s|$)", args)]
    assert torch, "torch==2.13.0 is not installed"
    assert project, "the project is not installed (pip install . / -e .)"
    assert torch[0] < project[0], "torch must be pinned before the project is installed"
    copies = [i for i, (instruction, args) in enumerate(dockerfile) if instruction == "COPY"]
    assert copies and copies[0] < project[0], "the project is installed before it is copied in"
    assert any(re.search(r"\b(build-essential|gcc)\b", args) for _, args in runs), "no C compiler for the kernels"


def test_dockerfile_runtime(dockerfile):
    last = {instruction: args for instruction, args in dockerfile}
    assert json.loads(last["ENTRYPOINT"]) == ["engram"]
    cmd = json.loads(last["CMD"])
    assert cmd[0] == "serve" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    port = cmd[cmd.index("--port") + 1]
    assert port in last["EXPOSE"].split()
    assert "HEALTHCHECK" in last and f"{port}/healthz" in last["HEALTHCHECK"]
    assert "curl" not in last["HEALTHCHECK"]
    users = [args for instruction, args in dockerfile if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
