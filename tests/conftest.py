"""Shared test helpers: the released fixture folder (../shared/reference beside the repository) and configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests stay on loopback: Ray reads these when it is imported (before any test module imports it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PGSEG_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
FIXTURE = REFERENCE / "released_fixture"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE / "released_layout_small.pth").is_file():
        pytest.fail(f"the released fixture is not at {FIXTURE} (set PGSEG_SHARED to the shared/ folder)")
    return FIXTURE


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster on 127.0.0.1 for the session (2 CPUs)."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield ray
    ray.shutdown()
