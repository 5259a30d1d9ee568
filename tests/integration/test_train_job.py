"""`ray start --head` on 127.0.0.1 (one for this module) and `ray job submit` of jobs.train and jobs.sweep, tracked by
a real `mlflow server`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mlflow_process import wait_for_http
from pipelines.runtime import free_port
from processes import stop_group
from test_sweep import _base, _children, _summary, _sweep

from conftest import REPO

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray head on 127.0.0.1 (its own ports and temp dir) for this module's jobs, stopped with its process
    group."""
    port, dash = free_port(), free_port()
    # every listening port of its own: the session's in-process Ray already holds the default agent ports
    own_ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "metrics-export-port", "runtime-env-agent-port",
                                                         "node-manager-port", "object-manager-port",
                                                         "ray-client-server-port")]
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # the job's `python` = this one
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats", *own_ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    wait_for_http(f"{address}/api/version", head, "ray start --head", 180)
    yield address, env, f"127.0.0.1:{port}"
    stop_group(head)
    shutil.rmtree(temp, ignore_errors=True)  # its logs and session files


def _submit(ray_head, *job: str) -> subprocess.CompletedProcess:
    """`ray job submit -- python -m JOB...` with this working tree as the job's working_dir; fails unless it
    succeeded."""
    address, env, _ = ray_head
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "runs", "outputs", "mlflow.db"],
                   "env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}
    command = [RAY, "job", "submit", "--address", address, "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-m", *job]
    for _attempt in range(12):  # the dashboard answers before the node's job agent is up: retry only that refusal
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in out.stdout + out.stderr:
            break
        time.sleep(5)
    assert out.returncode == 0 and "succeeded" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_ray_job_submit_trains_and_logs_to_mlflow(ray_head, shapes_data, mlflow_server, tmp_path):
    out = _submit(ray_head, "jobs.train", "--config", "tiny", "--name", "submitted",
                  "--set", f"data.shards=[{shapes_data['shards']}]", "--set", "data.batch_size=32",
                  "--set", "schedule.epochs=1", "--set", f"train.storage_path={tmp_path / 'runs'}",
                  "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.log_every=2",
                  "--set", "tracking.experiment=jobs")
    summary = json.loads(out.stdout[out.stdout.index("{\n"): out.stdout.index("\n}") + 2])
    assert summary["finished"] and summary["step"] == summary["total_steps"] == 16
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run"]]
    loss = client.get_metric_history(summary["mlflow_run"], "loss")
    assert sorted(m.step for m in loss) == list(range(2, 17, 2))
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["model.image.img_size"] == "64"
    assert (tmp_path / "runs" / "submitted" / "model.safetensors").is_file()


def test_ray_job_submit_runs_a_sweep(ray_head, shapes_data, mlflow_server, tmp_path):
    """`ray job submit -- python -m jobs.sweep`: the sweep's driver runs as the job, its trial on the cluster."""
    from mlflow.tracking import MlflowClient

    base = _base(tmp_path, shapes_data, mlflow_server, steps=8, experiment="sweep-job")
    out = _submit(ray_head, "jobs.sweep", "--config",
                  str(_sweep(tmp_path, "job", base, metric="eval/val/mIoU", space={"npr.phi": {"grid": [0.3]}})))
    assert "| default npr.phi=0.3 | 0.3 | finished | 8/8 |" in out.stdout
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sweep-job")
    parent = client.search_runs([exp.experiment_id], "attributes.run_name = 'sweep-job'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = _children(client, "sweep-job", parent[0].info.run_id)
    assert [c.data.params["npr.phi"] for c in children] == ["0.3"] and children[0].info.status == "FINISHED"
    assert [r["npr.phi"] for r in _summary(client, parent[0].info.run_id)] == [0.3]


PROBE = """
import json, os, sys
from pipelines.runtime import start_ray
start_ray(sys.argv[1])
import ray

@ray.remote(num_cpus=0)
class Probe:
    def ping(self):
        return 1

@ray.remote(num_cpus=0)
def ask(actor_id, decoy):  # as Ray Train's placement-group cleaner asks: the state API, no address named
    from ray.util.state import get_actor
    os.environ["RAY_TMPDIR"] = decoy  # where Ray looks for the machine's latest cluster: another one
    try:
        actor = get_actor(actor_id, timeout=10)
    except Exception as exc:
        return os.environ.get("RAY_API_SERVER_ADDRESS"), type(exc).__name__
    finally:
        del os.environ["RAY_TMPDIR"]
    return os.environ.get("RAY_API_SERVER_ADDRESS"), actor.state if actor else None

probe = Probe.remote()
ray.get(probe.ping.remote())
print(json.dumps(ray.get(ask.remote(probe._actor_id.hex(), sys.argv[2]))))
"""


def test_a_named_clusters_processes_ask_its_own_state_api(ray_head, tmp_path):
    """A process of a run on a named cluster that asks the state API without an address (Ray Train's placement-group
    cleaner does) asks this cluster's dashboard, not the machine's latest `ray start`ed cluster (here a decoy
    address file names another; before, the question went there, and the cleaner, finding no controller, removed
    the run's placement group)."""
    dashboard, env, gcs = ray_head
    decoy = tmp_path / "decoy"
    (decoy / "ray").mkdir(parents=True)
    (decoy / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
    env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", PROBE, gcs, str(decoy)], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [dashboard, "ALIVE"]
