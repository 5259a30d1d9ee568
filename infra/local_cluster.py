"""A multi-node Ray cluster on this one machine, every node and process on 127.0.0.1: a head that schedules nothing
(as ray_cluster.yaml's) and ``--workers`` worker nodes of ``--cpus`` CPUs each, each node with its own raylet, object
store and agents. For rehearsing the cluster path (infra/rehearse_cluster.sh): jobs reach it with `ray job submit
--address http://127.0.0.1:DASHBOARD_PORT`, as they reach a real cluster's head.

Why not `ray start` here: `ray start --address` refuses to join a node while Ray is kept on loopback
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and in its multi-node mode it turns 127.0.0.1 into the machine's address and
listens on every interface. Ray's own multi-node test harness (ray.cluster_utils) starts the same processes and keeps
them on 127.0.0.1. Runs until it gets SIGTERM or SIGINT.

    python infra/local_cluster.py --dashboard-port 8265 [--workers 2] [--cpus 1]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: every process on loopback
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dashboard-port", type=int, required=True, help="the head's dashboard (job API) port")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs of each worker node")
    args = parser.parse_args()
    if args.workers < 1 or args.cpus <= 0:
        print("error: --workers must be >= 1 and --cpus > 0", file=sys.stderr)
        return 2
    from ray.cluster_utils import Cluster

    from pipelines.runtime import free_port

    # every port of its own (Ray's defaults, e.g. the head agent's 52365, may be held by another Ray on this machine)
    ports = {name: free_port() for name in ("dashboard_agent_listen_port", "metrics_export_port",
                                            "ray_client_server_port")}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": args.dashboard_port, "node_ip_address": "127.0.0.1", **ports})
    for _ in range(args.workers):
        cluster.add_node(num_cpus=args.cpus, node_ip_address="127.0.0.1", metrics_export_port=free_port())
    cluster.wait_for_nodes()
    print(f"cluster: head {cluster.address} (0 CPUs), {args.workers} worker node(s) of {args.cpus:g} CPU(s); "
          f"jobs: ray job submit --address http://127.0.0.1:{args.dashboard_port}", flush=True)
    stop = {"now": False}

    def on_signal(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop["now"]:
        time.sleep(0.5)
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
