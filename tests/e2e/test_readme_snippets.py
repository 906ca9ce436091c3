"""Every Python snippet in README.md runs as written: each is extracted and run in its own `python` process
from an empty directory, with the settings a reader would have (a running `engram serve` at $ENGRAM_URL with
its key in $ENGRAM_API_KEY, for the SDK snippet) pointed at test resources: the shared Redis under a
private key prefix, a temporary data dir and a tiny checkpoint. A snippet that raises fails the test with
its output. (Shell lines are exercised by the end-to-end CLI and server tests.)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO

SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
SNIPPET_TIMEOUT_S = 180


def readme_snippets() -> list[str]:
    return SNIPPET.findall((REPO / "README.md").read_text())


def test_the_readme_has_python_snippets():
    assert len(readme_snippets()) >= 3


@pytest.mark.parametrize("index", range(len(readme_snippets())))
def test_readme_snippet_runs_as_written(index, engram_server, tmp_path):
    code = readme_snippets()[index]
    env = {**engram_server.cli_env(), **{k: v for k, v in engram_server.env.items() if k.startswith("ENGRAM_")},
           "ENGRAM_URL": engram_server.url, "ENGRAM_API_KEY": engram_server.api_key,
           "ENGRAM_DATA_DIR": str(tmp_path / "reader-data"), "PYTHONPATH": str(REPO),
           "ENGRAM_KEY_PREFIX": f"{engram_server.env['ENGRAM_KEY_PREFIX']}:reader"}  # an embedded runtime's own
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=SNIPPET_TIMEOUT_S)
    assert done.returncode == 0, f"README snippet {index} failed:\n{code}\n--- output ---\n{done.stdout}\n{done.stderr}"
