"""A real multi-node Ray cluster on 127.0.0.1, held by this process for a test.

Ray's own multi-node test utility (``ray.cluster_utils.Cluster``): one GCS, and one
raylet with its object store and workers per node, every node started with node address
127.0.0.1. ``ray start`` cannot do this on one host: it replaces 127.0.0.1 by the
interface address, and with that replacement turned off it refuses to add a second node
(docs/reindex.md).

    python tests/loopback_ray_cluster.py TEMP_DIR NODES CPUS_PER_NODE

Prints one JSON line ``{"address": "127.0.0.1:PORT", "node_ids": [...]}`` once every node
is up, holds the cluster until stdin closes or SIGTERM, then stops every node and exits.
TEMP_DIR must be short (Ray's unix socket paths live under it).
"""
from __future__ import annotations

import json
import os
import signal
import sys

# Read by ray when it is imported: keep 127.0.0.1 as given, keep Ray's files (and its
# "current cluster" address file) under TEMP_DIR, send no usage report.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_TMPDIR"] = sys.argv[1]
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)  # unwinds into the finally below


def main(temp_dir: str, nodes: int, cpus: int) -> None:
    from ray.cluster_utils import Cluster

    signal.signal(signal.SIGTERM, _stop)
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)  # RAY_TMPDIR/ray: address file
    node_args = {"num_cpus": cpus, "node_ip_address": "127.0.0.1", "temp_dir": temp_dir,
                 "object_store_memory": 100 * 1024 * 1024}
    # shutdown_at_exit: Ray's reaper also kills the nodes if this process dies unclean.
    cluster = Cluster(shutdown_at_exit=True)
    try:
        cluster.add_node(include_dashboard=False, **node_args)
        for _ in range(nodes - 1):
            cluster.add_node(**node_args)
        cluster.wait_for_nodes(timeout=120)
        ids = [n.node_id for n in [cluster.head_node, *cluster.worker_nodes]]
        print(json.dumps({"address": cluster.address, "node_ids": ids}), flush=True)
        sys.stdin.read()  # returns when the test closes our stdin
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
