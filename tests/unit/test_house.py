"""The house rules of ARCHITECTURE.md, read from the source: which floor may import which, the size of a room, where
Ray's private API may be used, and that there is one training step."""
import ast
from pathlib import Path

import pytest

from conftest import REPO

MAX_LINES = 450
PRIVATE_RAY_ADAPTERS = {"pipelines/ray_private.py", "pipelines/rendezvous.py"}


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (anywhere in the file), absolute."""
    names = set()
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names |= {f"{base}.{a.name}" for a in node.names} | {base}
    return names


@pytest.mark.parametrize("package, forbidden", [("pgseg", ("ray", "mlflow", "pipelines", "jobs")),
                                                ("pipelines", ("jobs",))])
def test_no_arrow_runs_up(package, forbidden):
    bad = {str(p.relative_to(REPO)): sorted(n for n in _imports(p) if n.split(".")[0] in forbidden)
           for p in _modules(package)}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("package", ["pgseg", "pipelines"])
def test_no_room_is_too_big_and_pipelines_has_rooms_by_idea(package):
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in _modules(package)}
    assert not {k: n for k, n in sizes.items() if n > MAX_LINES}
    if package == "pipelines":
        assert {p.name for p in (REPO / package).iterdir() if (p / "__init__.py").is_file()} >= {
            "data", "train", "tune", "flow"}


def test_private_ray_api_only_in_the_adapters():
    users = set()
    for path in _modules("pipelines") + _modules("jobs") + _modules("benchmarks"):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "ray" and any(p.startswith("_") for p in parts[1:]):
                users.add(str(path.relative_to(REPO)))
    assert users and users <= PRIVATE_RAY_ADAPTERS, users


def test_one_training_step_in_the_project():
    """Only pgseg/train/step.py runs a backward pass and an optimiser step; the Ray loop and the benchmarks use it."""
    stepping = set()
    for path in _modules("pgseg") + _modules("pipelines") + _modules("benchmarks"):
        text = path.read_text()
        if ".backward(" in text or "optimizer.step(" in text or "scaler.step(" in text:
            stepping.add(str(path.relative_to(REPO)))
    assert stepping == {"pgseg/train/step.py"}
    for user in ("pipelines/train/loop.py", "benchmarks/common.py", "benchmarks/train_scaling.py"):
        assert "TrainStep" in (REPO / user).read_text(), user


def test_every_mlflow_call_goes_through_the_tracking_services():
    """Runs through tracking.py, models (logged, registered, the pyfunc) through models.py; nothing else imports
    mlflow (pgseg, the science, never does)."""
    users = {str(p.relative_to(REPO)) for p in _modules("pipelines") + _modules("jobs") + _modules("pgseg")
             if any(n.split(".")[0] == "mlflow" for n in _imports(p))}
    assert users == {"pipelines/tracking.py", "pipelines/models.py"}
