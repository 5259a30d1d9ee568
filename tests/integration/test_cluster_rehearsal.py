"""The cluster path rehearsed on this machine (infra/rehearse_cluster.sh, the README's "On a cluster"): a 3-node Ray
cluster on 127.0.0.1 (a head without CPUs, two worker nodes), moto's S3 server and a remote `mlflow server` with its
artifacts in the bucket; `ray job submit` of the quickstart's workflow with its shards and runs in the bucket. The
script checks the bucket, the tracking server and every listening socket while the job ran; here its verdicts are
read back, and nothing it started may outlive it."""
from __future__ import annotations

import os
import subprocess
import time

from conftest import REPO


def _ours() -> set[int]:
    """PIDs of processes of the kinds the rehearsal starts (Ray's daemons, its cluster, S3 and MLflow servers)."""
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server|local_cluster.py|moto.server|pgseg-rehearsal"],
                         capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split()}


def test_the_quickstart_workflow_submitted_to_a_three_node_cluster_keeps_everything_in_s3(tmp_path):
    before = _ours()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}  # a user's shell
    proc = subprocess.run(["bash", "infra/rehearse_cluster.sh", str(tmp_path / "pgseg-rehearsal")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith(("ok ", "NO "))]
    assert proc.returncode == 0 and "rehearsal passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "cluster: 3 nodes, CPUs [0, 1.0, 1.0], addresses ['127.0.0.1']" in proc.stdout
    assert len(verdicts) == 10 and all(line.startswith("ok ") for line in verdicts), verdicts
    deadline = time.monotonic() + 60  # its nodes, the S3 server and the tracking server are gone (their last
    while not _ours() <= before and time.monotonic() < deadline:  # workers exit a few seconds after their raylet)
        time.sleep(1)
    assert _ours() <= before, _ours() - before
