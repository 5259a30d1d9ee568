"""Stopping a process the tests started in its own session (a `ray start --head --block`, a CLI run)."""
from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the process group, then SIGKILL to it if the leader has not ended within ``grace_s``: a Ray head
    given SIGTERM takes about 30 s to wind down here, and nothing the tests check happens in that time."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also whatever the leader left behind in its group
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
