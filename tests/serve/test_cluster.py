"""Must-show 3: a 3-node Ray cluster on one machine (`ray.cluster_utils.Cluster`: a head with no CPUs that holds
Serve's controller, HTTP proxy and the agent-memory service, and two worker nodes) runs the config's application
with the model worker and the API ingress at 2 replicas each, one per node, and the model's Engram tables in two
memory-service shard deployments (`EngramShard0/1`, on the worker nodes). Removing the worker node that holds
Engram shard 0 mid-run (its raylet and every process on it killed: a model-worker replica, an
orchestrator/ingress replica and at least that shard) loses no session: every task ends, its step log gap-free
and each step committed once (the surviving ingress replica's runner takes the lost replica's sessions over
when their leases expire; steps that failed meanwhile, a model call in flight on the lost worker or an Engram
fetch from the lost shard, are retried), and the lost shard is served again from the surviving node."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.runtime.conftest import delete_keys
from tests.serve.conftest import (
    assert_tasks_end_once_each,
    deploy_config_app,
    free_port,
    replica_probe,
    start_until_one_is_mid_run,
)

MiB = 2**20
ONE_PER_NODE = {"max_replicas_per_node": 1, "num_replicas": 2}
DEPLOYMENTS = {
    "MemoryServiceDeployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0, "resources": {"head": 0.01}}},
    "ModelWorkerDeployment": {**ONE_PER_NODE, "ray_actor_options": {"num_cpus": 0.5}},
    "ApiIngress": {**ONE_PER_NODE, "ray_actor_options": {"num_cpus": 0.2}},
    **{f"EngramShard{i}": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}} for i in range(2)},
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[object, list, int]]:
    """(the Cluster, its two worker nodes, Serve's HTTP port): the driver connected, Serve started with its
    proxy on the head only (the nodes share one address). The nodes take the host's address (a driver
    rewrites a loopback cluster address to it); the GCS a free port, never Redis's 6379."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    gcs_port = free_port()
    assert gcs_port != 6379
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"head": 1}, "gcs_server_port": gcs_port,
        "include_dashboard": False, "object_store_memory": 128 * MiB})
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=128 * MiB)
                 for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=f"engram-cluster-{uuid.uuid4().hex[:8]}",
                 log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield cluster, nodes, port
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def node_of(app: str, deployment: str) -> dict[str, str]:
    """{replica name: the id of the node it runs on}."""
    def node_id(replica):
        import ray

        return ray.get_runtime_context().get_node_id()

    return replica_probe(app, deployment, node_id)


def test_losing_a_node_loses_no_session(cluster, redis_url, serve_model_dir, tmp_path):
    ray_cluster, nodes, port = cluster
    prefix = f"test-cluster-{uuid.uuid4().hex[:12]}"
    try:
        server = deploy_config_app(port, redis_url, prefix, serve_model_dir, tmp_path, DEPLOYMENTS,
                                   args={"engram_shards": 2})
        worker_nodes = {node.node_id for node in nodes}
        names = ("ModelWorkerDeployment", "ApiIngress", "EngramShard0", "EngramShard1")
        placed = {name: set(node_of(server.app_name, name).values()) for name in names}
        assert placed["ModelWorkerDeployment"] == placed["ApiIngress"] == worker_nodes, placed
        assert placed["EngramShard0"] | placed["EngramShard1"] <= worker_nodes, placed

        tasks, _ = start_until_one_is_mid_run(server, "wanderer")
        (victim,) = [node for node in nodes if node.node_id in placed["EngramShard0"]]
        ray_cluster.remove_node(victim, allow_graceful=False)
        assert_tasks_end_once_each(server, tasks)
        survivors = {name: set(node_of(server.app_name, name).values()) for name in names}
        assert all(victim.node_id not in where for where in survivors.values()), survivors
        assert survivors["EngramShard0"] and survivors["EngramShard1"], survivors  # both shards served again
        print(f"removed node {victim.node_id[:8]} (a model-worker, an ingress replica and Engram shard 0); "
              f"{len(tasks)} tasks ended, gap-free; replicas now on {survivors}")
    finally:
        delete_keys(redis_url, prefix)
