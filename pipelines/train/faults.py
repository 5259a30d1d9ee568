"""Fault drills of a training run, named in ``PGSEG_FAULT_INJECT`` (comma-separated; STEP counts completed steps,
from 1; RANK defaults to 0): ``kill@STEP[:RANK]`` SIGKILLs that worker after step STEP, ``killmid@STEP[:RANK]``
inside step STEP's backward pass (the other ranks wait in the gradient all-reduce), ``killsave@STEP[:RANK]`` while
the checkpoint of step STEP is being written (its own files written, not yet reported: the other ranks' files may
already be in storage); each once per run. ``nan@INDEX[:RANK]`` makes that rank's loss NaN in the step with that
0-based index (the finite check is agreed over the ranks: every rank skips the step)."""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FAULT_ENV = "PGSEG_FAULT_INJECT"
KINDS = ("kill", "killmid", "killsave", "nan")


def parse_faults(spec: str | None) -> dict[str, tuple[int, int]]:
    """``kill@5:1,nan@3`` → {"kill": (5, 1), "nan": (3, 0)} (step, rank)."""
    faults: dict[str, tuple[int, int]] = {}
    for item in filter(None, (spec or "").split(",")):
        kind, _, rest = item.strip().partition("@")
        step, _, rank = rest.partition(":")
        if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected kill@STEP[:RANK], killmid@STEP[:RANK], "
                             f"killsave@STEP[:RANK] or nan@INDEX[:RANK], comma-separated")
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


def kill_in_backward(model: torch.nn.Module, marker: Path) -> torch.utils.hooks.RemovableHandle:
    """Arm :func:`kill_once` to fire when the first parameter's gradient is computed (mid-backward); remove the
    returned handle after the step."""
    first = next(p for p in model.parameters() if p.requires_grad)

    def fire(grad: torch.Tensor) -> torch.Tensor:
        kill_once(marker)
        return grad

    return first.register_hook(fire)
