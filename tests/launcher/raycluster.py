"""`python -m tests.launcher.raycluster NODES CPUS GPUS`: a local Ray cluster for the tests.

`python -m tests.launcher.raycluster --leftovers ADDRESS NAMESPACE` prints, as JSON, the
named actors and the placement groups (not removed) that NAMESPACE still has there.

Starts NODES logical nodes on this machine (`ray.cluster_utils.Cluster`), each offering CPUS
CPUs and GPUS simulated GPUs (Ray hands out their ids and sets `CUDA_VISIBLE_DEVICES`; no
device exists), prints the cluster's address on one line, and shuts the cluster down when
its standard input closes. Meanwhile it reads commands, one a line, and answers each with
one line: `add` starts one more such node (answer: its node id), `remove NODE_ID` kills that
node's processes at once, as a lost machine would (answer: `removed`). Node deaths are
detected within about 2 s (the health check is made faster than Ray's default). Run as a
separate process so that Ray's global state, threads and warnings stay out of the pytest
process. Where Ray writes (`RAY_TMPDIR`, `HOME`) and that token authentication is off
(`RAY_AUTH_MODE`) come from the environment the caller gives it.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster


def leftovers(address: str, namespace: str) -> dict[str, list[str]]:
    ray.init(address=address, namespace=namespace, logging_level="ERROR", log_to_driver=False)
    actors = [
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == namespace
    ]
    groups = [
        entry["name"]
        for entry in ray.util.placement_group_table().values()
        if entry["name"].startswith(f"{namespace}-") and entry["state"] != "REMOVED"
    ]
    return {"actors": actors, "placement_groups": groups}


def main() -> None:
    if sys.argv[1] == "--leftovers":
        print(json.dumps(leftovers(sys.argv[2], sys.argv[3])), flush=True)
        return
    nodes, cpus, gpus = (int(arg) for arg in sys.argv[1:4])
    fast_death = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": cpus, "num_gpus": gpus, "_system_config": fast_death},
    )
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus, num_gpus=gpus)
        cluster.wait_for_nodes()
        print(cluster.address, flush=True)
        for line in sys.stdin:
            command, *args = line.split()
            if command == "add":
                node = cluster.add_node(num_cpus=cpus, num_gpus=gpus)
                cluster.wait_for_nodes()
                print(node.node_id, flush=True)
            elif command == "remove":
                (node,) = (n for n in cluster.list_all_nodes() if n.node_id == args[0])
                cluster.remove_node(node, allow_graceful=False)
                print("removed", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
