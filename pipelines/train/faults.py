"""Fault drills of a training run, named in ``PGSEG_FAULT_INJECT``: ``kill@STEP[:RANK]`` SIGKILLs that worker once
per run after STEP, ``nan@STEP`` makes that step's loss NaN."""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

FAULT_ENV = "PGSEG_FAULT_INJECT"


def parse_faults(spec: str | None) -> dict[str, tuple[int, int]]:
    """``kill@5:1,nan@3`` → {"kill": (5, 1), "nan": (3, 0)} (step, rank)."""
    faults: dict[str, tuple[int, int]] = {}
    for item in filter(None, (spec or "").split(",")):
        kind, _, rest = item.strip().partition("@")
        step, _, rank = rest.partition(":")
        if kind not in ("kill", "nan") or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected kill@STEP[:RANK] or nan@STEP, comma-separated")
        faults[kind] = (int(step), int(rank or 0))
    return faults


def kill_once(marker: Path) -> None:
    """SIGKILL this process, once per marker: the drill of a lost worker."""
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("killed\n")
    log.warning("fault drill: SIGKILL of this worker (pid %d)", os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)
