"""A real S3-compatible server for the tests: moto's standalone server (the one Ray's own S3 tests use; pure Python
from PyPI, so `pip install -e '.[test]'` brings it) on 127.0.0.1. Its address is chosen when the test session starts
and put in the environment as S3 clients read it (``AWS_ENDPOINT_URL``, test credentials), so every process started
afterwards (Ray's workers, img2dataset's) reaches the same server; the server itself starts when a test first
needs it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from mlflow_process import free_port, wait_for_http

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def reserve_endpoint() -> str:
    """Pick the server's address and point S3 clients at it (before Ray starts: its workers inherit it)."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    return endpoint


class S3Server:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.proc: subprocess.Popen | None = None

    def start(self) -> "S3Server":
        port = self.endpoint.rsplit(":", 1)[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_http(f"{self.endpoint}/moto-api/", self.proc, "moto's S3 server", 60)
        return self

    def bucket(self, name: str) -> str:
        """A new bucket; its ``s3://`` URI."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
