"""benchmarks/engram_remote.py: arguments that could not run (more shards than the 2 CPUs given to Ray hold, which
would wait for resources forever; no rounds; no tokens) are refused in one line before Ray starts."""

from __future__ import annotations

import subprocess
import sys

from tests.benchmarks import load_script

remote = load_script("engram_remote")


def test_arguments_that_cannot_run_are_refused_in_one_line():
    for argv, message in ((["--shards", str(remote.MAX_SHARDS + 1)], "--shards must be 1 to"),
                          (["--shards", "0"], "--shards must be 1 to"), (["--rounds", "0"], "--rounds must be"),
                          (["--new-tokens", "0"], "--new-tokens must be")):
        done = subprocess.run([sys.executable, str(remote.__file__), *argv], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, argv
        assert message in done.stderr.strip().splitlines()[-1], done.stderr


def test_the_most_shards_fit_the_cpus_ray_is_given():
    assert len(remote.WORKERS) * remote.WORKER_CPUS + remote.MAX_SHARDS * remote.SHARD_CPUS <= 2
