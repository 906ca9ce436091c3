"""`engram serve` picks its mode: Ray Serve by default (`--ray` is an accepted alias, `--address` joins a
cluster), the one-process server with `--embedded`. The servers themselves are replaced by recorders here;
tests/e2e runs the embedded one for real and tests/serve/test_serve_app.py the Ray Serve application."""

from __future__ import annotations

import uuid

import pytest

from tests.runtime.conftest import delete_keys
from tests.serve.conftest import free_port


@pytest.fixture
def started(monkeypatch, tmp_path):
    """Which server `main(["serve", ...])` started: "ray" (with its --address) or "embedded"."""
    import uvicorn

    import runtime.api
    import runtime.cli.on_ray

    monkeypatch.setenv("ENGRAM_DATA_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(runtime.cli.on_ray, "serve_on_ray",
                        lambda args, settings, host, port: calls.append(("ray", args.address)) or 0)
    monkeypatch.setattr(runtime.api, "create_app", lambda settings, **kwargs: "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(("embedded", None)))
    return calls


@pytest.mark.parametrize(("flags", "want"), [([], ("ray", None)), (["--ray"], ("ray", None)),
                                             (["--address", "auto"], ("ray", "auto")),
                                             (["--embedded"], ("embedded", None))])
def test_serve_runs_on_ray_unless_embedded(started, flags, want):
    from runtime.cli import main

    assert main(["serve", "--port", str(free_port()), *flags]) == 0
    assert started == [want]


def test_serve_refuses_contradicting_modes(started, capsys):
    from runtime.cli import main

    assert main(["serve", "--port", str(free_port()), "--embedded", "--address", "auto"]) == 2
    assert "--address" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--embedded", "--ray"])
    assert refused.value.code == 2 and started == []


def test_serve_help_names_both_modes(capsys):
    from runtime.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Ray Serve application" in text and "--embedded" in text and "--address" in text


def _serve_on_ray_failing(monkeypatch, tmp_path, redis_url, address, prefix):
    """`serve_on_ray` with Ray replaced by a deploy that fails (a bad checkpoint, Ctrl-C mid-deploy)."""
    import runtime.serve
    from runtime.cli.on_ray import serve_on_ray
    from runtime.settings import Settings

    def failing_deploy(settings, **kwargs):
        raise RuntimeError("no checkpoint at /nonexistent")

    monkeypatch.setattr(runtime.serve, "deploy", failing_deploy)
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, key_prefix=prefix)
    args = type("Args", (), {"address": address})()
    with pytest.raises(RuntimeError, match="no checkpoint"):
        serve_on_ray(args, settings, "127.0.0.1", free_port())
    return settings


def test_the_first_key_is_shown_even_when_the_deploy_fails(monkeypatch, tmp_path, redis_url, capsys):
    """The key is created before deploying; shown only after a successful deploy, a failed one lost it for good
    (later starts find a key and create none)."""
    prefix = f"cli-serve-{uuid.uuid4().hex[:12]}"
    try:
        _serve_on_ray_failing(monkeypatch, tmp_path, redis_url, None, prefix)
        out = capsys.readouterr().out.splitlines()
        at = next(i for i, line in enumerate(out) if "created the first API key" in line)
        assert out[at + 1].startswith("engram_")
        _serve_on_ray_failing(monkeypatch, tmp_path, redis_url, None, prefix)
        assert "created the first API key" not in capsys.readouterr().out  # one first key, already shown
    finally:
        delete_keys(redis_url, prefix)


def test_joining_a_cluster_warns_of_state_only_this_machine_holds(monkeypatch, tmp_path, redis_url, capsys):
    from runtime.cli.on_ray import _shared_state_warnings
    from runtime.settings import Settings

    args = type("Args", (), {"address": "ray://head:10001"})()
    warnings = _shared_state_warnings(args, Settings(data_dir=tmp_path))
    assert [w.split(" is unset")[0] for w in warnings] == ["engram: warning: ENGRAM_REDIS_URL",
                                                           "engram: warning: ENGRAM_DATABASE_URL"]
    shared = Settings(data_dir=tmp_path, redis_url=redis_url, database_url="postgresql://db/engram")
    assert _shared_state_warnings(args, shared) == []
    assert _shared_state_warnings(type("Args", (), {"address": None})(), Settings(data_dir=tmp_path)) == []


def test_stopping_deletes_only_this_app_on_a_joined_cluster(monkeypatch):
    import runtime.serve.deployments as deployments

    calls = []
    monkeypatch.setattr(deployments.serve, "delete", lambda name: calls.append(("delete", name)))
    monkeypatch.setattr(deployments.serve, "shutdown", lambda: calls.append(("serve.shutdown",)))
    monkeypatch.setattr(deployments.ray, "shutdown", lambda: calls.append(("ray.shutdown",)))
    deployments.shutdown("ray://head:10001")
    assert calls == [("delete", "engram"), ("ray.shutdown",)]  # the cluster's other apps keep running
    calls.clear()
    deployments.shutdown(None)
    assert calls == [("serve.shutdown",), ("ray.shutdown",)]  # the local instance this command started
