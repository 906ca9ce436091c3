"""`engram serve` picks its mode: Ray Serve by default (`--ray` is an accepted alias, `--address` joins a
cluster), the one-process server with `--embedded`. The servers themselves are replaced by recorders here;
tests/e2e runs the embedded one for real and tests/serve/test_serve_app.py the Ray Serve application."""

from __future__ import annotations

import pytest

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
