"""Shared test helpers: the released fixture folder (../shared/reference beside the repository) and configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
