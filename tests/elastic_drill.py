"""The elastic-training drill, run in a process of its own by tests/integration/test_elastic.py: a 3-node Ray cluster
on 127.0.0.1 (a head for Ray Data's tasks, which no training worker fits on, and two worker nodes that each hold one
training worker), an elastic run (train.workers [1, 2]) trained in a thread, and while it trains: a worker node
removed once two checkpoints of two workers are stored (the first is then complete: a report waits for every rank),
and a node added again once a checkpoint of one worker is. Every wait is bounded in time. Ray Train first tries the
old size again after a node is lost, until its worker-group start timeout (60 s by default, 20 s here). Prints one line ``RESULT {json}``: the events with the step stored at each, and the
run's result.

    python tests/elastic_drill.py CONFIG.yaml
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: every process on loopback
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")  # inherited by the nodes' processes

import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pgseg.config import load_config  # noqa: E402
from pgseg.train import STATE_FILE  # noqa: E402
from pipelines.runtime import free_port  # noqa: E402
from pipelines.train import fit, plan_training  # noqa: E402

NODE_CPUS = 2  # one training worker of 2 CPUs per worker node (train.cpus_per_worker 2); the head's 1 CPU is Ray Data's
PHASE_S = 300  # the longest wait for any one event


def stored(run_dir: Path) -> list[tuple[int, int]]:
    """(step, world size) of every complete checkpoint in the run's folder, by step."""
    out = []
    for folder in sorted(run_dir.glob("checkpoint_step*")):
        try:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError):
            continue  # being written
        out.append((int(state["step"]), int(state["world_size"])))
    return out


def wait_for(what: str, ready, thread: threading.Thread) -> None:
    deadline = time.monotonic() + PHASE_S
    while not ready():
        if not thread.is_alive():
            raise RuntimeError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {PHASE_S} s")
        time.sleep(0.5)


def main() -> int:
    config = load_config(sys.argv[1])
    plan = plan_training(config)
    run_dir = Path(plan.storage_path) / plan.name
    ports = {name: free_port() for name in ("dashboard_agent_listen_port", "metrics_export_port",
                                            "ray_client_server_port", "dashboard_port")}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "node_ip_address": "127.0.0.1",
        **ports})

    def add_node():
        return cluster.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1", metrics_export_port=free_port())

    nodes = [add_node(), add_node()]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    out: dict = {"events": []}
    started = time.monotonic()

    def event(name: str) -> None:
        out["events"].append({"event": name, "s": round(time.monotonic() - started, 1), "stored": stored(run_dir)})

    def train() -> None:
        try:
            result = fit(plan)
            out["result"] = {"step": result.step, "finished": result.finished, "run_id": result.run_id,
                             "checkpoint": result.checkpoint}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=train, daemon=True)
    try:
        thread.start()
        wait_for("two checkpoints of two workers", lambda: sum(w == 2 for _, w in stored(run_dir)) >= 2, thread)
        # the worker node the driver is not attached to (every node here is 127.0.0.1, so the driver may have
        # joined a worker node's raylet; on a cluster the driver's node is the head, which stays)
        driver_node = ray.get_runtime_context().get_node_id()
        victim = next(n for n in nodes if n.node_id != driver_node)
        cluster.remove_node(victim)  # its training worker dies with it
        event("node removed")
        wait_for("checkpoint of one worker", lambda: any(w == 1 for _, w in stored(run_dir)), thread)
        add_node()
        event("node added")
        removed_at = out["events"][0]["stored"][-1][0]
        wait_for("checkpoint of two workers again",
                 lambda: any(w == 2 and s > removed_at for s, w in stored(run_dir)), thread)
        event("grown back")
        thread.join(PHASE_S)
        if thread.is_alive():
            raise RuntimeError(f"the run did not end within {PHASE_S} s of growing back")
    except RuntimeError as exc:
        out["drill_error"] = str(exc)
    finally:
        out["checkpoints"] = stored(run_dir)
        print("RESULT " + json.dumps(out), flush=True)
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
