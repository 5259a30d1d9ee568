"""Every command that starts Ray, run as a user runs it (a fresh process, none of the tests' Ray settings in its
environment) while someone's own `ray start --head` runs on the same machine: each must finish, listen on
127.0.0.0/8 only (Ray's GCS, raylets, workers, dashboard and agents, torch's rendezvous store), and leave the other
cluster alone (no driver of ours joins it; it still names itself the current cluster)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from listening import run_watched
from processes import stop_group
from test_sweep import _base, _sweep

from conftest import REPO
from pipelines.runtime import free_port

RAY = str(Path(sys.executable).parent / "ray")
PGSEG = [sys.executable, "-m", "jobs.cli"]
CURRENT = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # where `ray start` names its cluster


def _user_env(home: Path) -> dict[str, str]:
    """The environment of a user's shell: nothing of the tests' Ray settings (loopback switch, quiet levels)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONWARNINGS"}
    return {**env, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def stray_cluster():
    """Someone's `ray start --head` in Ray's default temp folder (so Ray's current-cluster file names it), on ports
    of its own; its job list is read through its dashboard. The current-cluster file is put back afterwards."""
    saved = CURRENT.read_text() if CURRENT.exists() else None
    port, dashboard = free_port(), free_port()
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "metrics-export-port", "runtime-env-agent-port",
                                                    "node-manager-port", "object-manager-port",
                                                    "ray-client-server-port")]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while not (CURRENT.exists() and CURRENT.read_text().strip() == address):
        if time.monotonic() > deadline or head.poll() is not None:
            os.killpg(head.pid, signal.SIGKILL)
            pytest.fail("the stray `ray start --head` did not come up")
        time.sleep(0.5)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}"}
    stop_group(head)
    if saved is None:
        CURRENT.unlink(missing_ok=True)
    else:
        CURRENT.write_text(saved)


def _drivers(cluster: dict) -> int:
    from ray.util.state import list_jobs

    return len(list_jobs(address=cluster["dashboard"], raise_on_missing_output=False))


def _run(command: list[str], tmp_path: Path, timeout: float = 600):
    watched = run_watched(command, env=_user_env(tmp_path), cwd=tmp_path, timeout=timeout)
    assert watched.returncode == 0, watched.output[-4000:]
    assert watched.sockets, "the command's Ray was never seen listening"
    assert not watched.exposed(), f"listening beyond loopback: {sorted(watched.exposed())}"
    assert "Found multiple active Ray instances" not in watched.output
    return watched


def test_train_eval_download_and_sweep_listen_on_loopback_beside_a_stray_cluster(stray_cluster, shapes_data,
                                                                              tmp_path):
    before = _drivers(stray_cluster)
    root = shapes_data["root"]
    download = _run([*PGSEG, "data", "download", str(root / "urls"), str(tmp_path / "shards"), "--distributor",
                     "ray", "--image-size", "64", "--per-shard", "256", "--processes", "1", "--threads", "4"],
                    tmp_path)
    assert "\"samples\": 512" in download.output
    train = _run([*PGSEG, "train", "--config", "tiny", "--name", "edge", "--set", f"data.shards=[{tmp_path / 'shards'}]",
                  "--set", "data.batch_size=32", "--set", "data.samples_per_epoch=64", "--set", "schedule.epochs=1",
                  "--set", "train.workers=2", "--set", "train.cpus_per_worker=0.5", "--set", "tracking.enabled=false",
                  "--set", f"train.storage_path={tmp_path / 'runs'}"], tmp_path)
    assert sum(name.startswith("ray::RayTrainWo") for _, _, name in train.sockets) >= 2  # the rendezvous included
    model = tmp_path / "runs" / "edge" / "model.safetensors"
    assert model.is_file() and "\"finished\": true" in train.output
    evaluated = _run([*PGSEG, "eval", "--checkpoint", str(model), "--dataset", f"voc:{shapes_data['val']}",
                      "--no-track", "--overlays", "0"], tmp_path)
    assert "mIoU" in evaluated.output and "logged to MLflow" not in evaluated.output
    base = _base(tmp_path, {**shapes_data, "shards": tmp_path / "shards"}, f"sqlite:///{tmp_path / 'sweep.db'}",
                 steps=4)
    spec = _sweep(tmp_path, "edge", base, metric="eval/val/mIoU", space={"train.seed": {"grid": [0]}})
    swept = _run([*PGSEG, "sweep", "--config", str(spec)], tmp_path)
    assert "sweep edge: 1 trial(s)" in swept.output
    assert _drivers(stray_cluster) == before  # none of our commands joined the other cluster
    assert CURRENT.read_text().strip() == stray_cluster["address"]


def test_quickstart_listens_on_loopback_beside_a_stray_cluster(stray_cluster, tmp_path):
    before = _drivers(stray_cluster)
    sets = ["sources.shapes.train_images=256", "sources.shapes.val_images=4", "sources.shapes.dev_images=4",
            "download.number_sample_per_shard=128", "train.schedule.epochs=1", "train.data.batch_size=32",
            "train.eval.every_steps=1000"]
    quick = _run([*PGSEG, "quickstart", "--workdir", str(tmp_path / "work"),
                  *[arg for item in sets for arg in ("--set", item)]], tmp_path, timeout=900)
    assert "quickstart:" in quick.output and "mIoU" in quick.output
    assert yaml.safe_load((tmp_path / "work" / "eval" / "val.json").read_text())["images"] == 4
    assert _drivers(stray_cluster) == before
