"""A real ``mlflow server`` (sqlite backend, local artifact folder) on 127.0.0.1 that a test can stop and start
again on the same port and database: the tracking outage drill."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.runtime import free_port


def wait_for_http(url: str, proc, what: str, seconds: float) -> None:
    """Poll ``url`` until it answers 200 (bounded); fail the test, killing ``proc``'s group, if it never does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"{what} exited at start")
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{what} did not answer {url} within {seconds:g} s")


class MlflowServer:
    def __init__(self, root: Path, artifacts: str | None = None):
        self.root, self.port = Path(root), free_port()
        self.artifacts = artifacts or str(self.root / "artifacts")  # a folder, or an s3:// URI
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_http(f"{self.uri}/health", self.proc, "mlflow server", 120)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
