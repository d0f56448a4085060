"""A Ray cluster of two nodes on this machine (separate raylets, own resources and labels),
for placement tests. Run as a process: `python -m tests.deployments.two_nodes serve` prints the
cluster address and keeps the cluster until its stdin closes; `... placement ADDRESS` prints,
per Serve deployment, the `zone` label of the node each live replica runs on."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

ZONES = ("a", "b")


def serve_cluster() -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "labels": {"zone": ZONES[0]}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=4, labels={"zone": ZONES[1]})
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    sys.stdin.read()
    cluster.shutdown()


def placement(address: str) -> dict[str, list[str]]:
    import ray
    from ray._private.state import actors

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    zones = {node["NodeID"]: (node.get("Labels") or {}).get("zone", "?") for node in ray.nodes()}
    found: dict[str, list[str]] = defaultdict(list)
    for actor in actors().values():
        name = actor.get("ActorClassName", "")
        if actor.get("State") == "ALIVE" and name.startswith("ServeReplica:"):
            deployment = name.split(":")[-1]
            found[deployment].append(zones.get(actor["Address"]["NodeID"], "?"))
    ray.shutdown()
    return {name: sorted(nodes) for name, nodes in found.items()}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve_cluster()
    else:
        print(json.dumps(placement(sys.argv[2])))
