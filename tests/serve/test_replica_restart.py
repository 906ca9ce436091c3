"""Must-show 4: a replica's process killed mid-run (SIGKILL; Serve starts a new replica in its place) loses no
in-flight task. The application of deploy/serve_config.yaml runs tasks of a tiny RANDOM model (each ends
`completed` or `failed`, both terminal); once one has committed an action step and is still running (and a
second one was just submitted), the
process of the model-worker replica (its model calls fail and the orchestrator retries the step on the new
replica) or of the API ingress replica (the orchestrator itself: the new replica's runner takes the sessions
over when their 2 s leases expire) is killed. Every task then ends with a gap-free step log, every step
committed once in its event stream, and the deployment runs a replica in a new process."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.test_http_server import _task_state
from tests.serve.conftest import assert_tasks_end_once_each, replica_probe, start_until_one_is_mid_run

RECOVERY_TIMEOUT_S = 150.0


def replica_pids(app: str, deployment: str) -> dict[str, int]:
    """{replica actor name: its process id} of a deployment's live replicas."""
    return replica_probe(app, deployment, lambda replica: os.getpid())


@pytest.mark.parametrize("deployment", ["ModelWorkerDeployment", "ApiIngress"])
def test_killed_replica_process_loses_no_in_flight_task(deployed, redis_url, deployment):
    from ray import serve

    server = deployed
    tasks, task_id = start_until_one_is_mid_run(server, f"survivor-{deployment.lower()}")
    (old_name, old_pid), = replica_pids(server.app_name, deployment).items()
    os.kill(old_pid, signal.SIGKILL)
    state = _task_state(redis_url, server.key_prefix, task_id)
    assert not state.finished, f"the kill did not land mid-task: {state.status}"  # else the test proves nothing

    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while not (new := {n: p for n, p in replica_pids(server.app_name, deployment).items() if p != old_pid}):
        assert time.monotonic() < deadline, "no new replica process"
        time.sleep(0.5)
    assert old_name not in new, new
    assert_tasks_end_once_each(server, tasks, RECOVERY_TIMEOUT_S)
    status = serve.status().applications[server.app_name].deployments[deployment].status
    assert status == "HEALTHY", status
    print(f"killed {deployment} replica pid {old_pid}; new replica(s) {new}; {len(tasks)} tasks ended, gap-free")
