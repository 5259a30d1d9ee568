"""The cluster path rehearsed on this machine (infra/rehearse_cluster.sh, the README's "On a cluster"): a 3-node Ray
cluster on 127.0.0.1 (a head without CPUs, two worker nodes), moto's S3 server and a remote `mlflow server` with its
artifacts in the bucket; `ray job submit` of the quickstart's workflow with its shards and runs in the bucket. The
script checks the bucket, the tracking server and every listening socket while the job ran; here its verdicts are
read back, and nothing it started may outlive it."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import REPO


def _started_by(work: Path) -> set[int]:
    """PIDs of live processes the rehearsal in ``work`` started (their environment carries PGSEG_REHEARSAL=work):
    only its own, not those of tests running beside it."""
    marker = f"PGSEG_REHEARSAL={work}".encode()
    pids = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                pids.add(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def test_the_quickstart_workflow_submitted_to_a_three_node_cluster_keeps_everything_in_s3(tmp_path):
    work = tmp_path / "pgseg-rehearsal"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}  # a user's shell
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(["bash", "infra/rehearse_cluster.sh", str(work)], cwd=REPO, env=env, stdout=o, stderr=e)
        seen: set[int] = set()  # what the marker finds while it runs: its servers, its nodes' daemons, the job
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _started_by(work)
            time.sleep(2)
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = out.read_text(), err.read_text()
    verdicts = [line for line in stdout.splitlines() if line.startswith(("ok ", "NO "))]
    assert proc.returncode == 0 and "rehearsal passed" in stdout, stdout[-4000:] + stderr[-3000:]
    assert "cluster: 3 nodes, CPUs [0, 1.0, 1.0], addresses ['127.0.0.1']" in stdout
    assert len(seen) >= 8, seen  # S3, MLflow, the cluster script, GCS, 3 raylets, the job's driver and more
    assert len(verdicts) == 10 and all(line.startswith("ok ") for line in verdicts), verdicts
    deadline = time.monotonic() + 60  # its nodes, the S3 server and the tracking server are gone (their last
    while _started_by(work) and time.monotonic() < deadline:  # workers exit a few seconds after their raylet)
        time.sleep(1)
    assert not _started_by(work), _started_by(work)
