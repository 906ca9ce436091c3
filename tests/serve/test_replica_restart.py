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

import httpx
import pytest

from runtime.sdk import Client
from tests.e2e.test_http_server import (
    KILL_INPUTS,
    TERMINAL_STATUSES,
    _task_state,
    assert_gap_free,
    committed_indexes,
    create_agent,
    read_events,
    submit,
)
from tests.serve.conftest import ServeServer

RECOVERY_TIMEOUT_S = 150.0


def replica_pids(app: str, deployment: str) -> dict[str, int]:
    """{replica actor name: its process id} of a deployment's live replicas."""
    import ray

    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and f"{app}#{deployment}#" in a["name"]]
    pids = {}
    for name in actors:
        try:
            actor = ray.get_actor(name, namespace="serve")
            pids[name] = ray.get(actor.__ray_call__.remote(lambda replica: os.getpid()), timeout=10)
        except Exception:
            continue  # a replica that is going away
    return pids


def wait_for(what: str, check, timeout_s: float = RECOVERY_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f}s"
        time.sleep(0.5)


def task_status(server: ServeServer, task_id: str) -> str | None:
    """The task's status over HTTP; None while the API is not answering (its replica restarting)."""
    try:
        response = httpx.get(f"{server.url}/v1/tasks/{task_id}", timeout=10.0,
                             headers={"Authorization": f"Bearer {server.api_key}"})
    except httpx.TransportError:
        return None
    return response.json()["status"] if response.status_code == 200 else None


@pytest.mark.parametrize("deployment", ["ModelWorkerDeployment", "ApiIngress"])
def test_killed_replica_process_loses_no_in_flight_task(deployed, redis_url, deployment):
    from ray import serve

    server = deployed
    tasks = []
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"},
                      timeout=30.0) as http:
        agent = f"survivor-{deployment.lower()}"
        create_agent(http, agent, max_steps=4, max_tokens_per_step=160)
        for text in KILL_INPUTS:  # a random model may end a task at once: until one goes on after an action
            tasks.append(submit(http, agent, text)["id"])
            before = read_events(server, tasks[-1],
                                 stop_when=lambda e: e.type == "step_committed" and e.data.get("kind") == "action")
            if before and not before[-1].terminal:
                break
        else:
            pytest.fail("no task committed an action step before ending")
        task_id = tasks[-1]
        tasks.append(submit(http, agent, "Add 5 and 9, then remember the sum.")["id"])  # in flight too
    (old_name, old_pid), = replica_pids(server.app_name, deployment).items()
    os.kill(old_pid, signal.SIGKILL)
    state = _task_state(redis_url, server.key_prefix, task_id)
    assert not state.finished, f"the kill did not land mid-task: {state.status}"  # else the test proves nothing

    new = wait_for("a new replica process", lambda: {n: p for n, p in replica_pids(server.app_name, deployment).items()
                                                     if p != old_pid})
    assert old_name not in new, new
    for other in tasks:
        wait_for(f"task {other} terminal", lambda other=other: task_status(server, other) in TERMINAL_STATUSES)
    with Client(server.url, server.api_key) as client:
        for other in tasks:
            transcript = client.tasks.steps(other)
            assert_gap_free(transcript)
            assert committed_indexes(read_events(server, other)) == list(range(transcript.step_count)), other
    status = serve.status().applications[server.app_name].deployments[deployment].status
    assert status == "HEALTHY", status
    print(f"killed {deployment} replica pid {old_pid}; new replica(s) {new}; {len(tasks)} tasks ended, gap-free")
