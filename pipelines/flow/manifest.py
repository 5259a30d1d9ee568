"""A stage's manifest, ``<workdir>/.workflow/<stage>.json``: the hash of its inputs, the digest of what it produced,
its outputs, its seconds, its MLflow run and figures. A stage whose manifest matches (and whose outputs are still
there) is skipped."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pgseg.fileio import atomic_write_json
from pipelines.storage import exists

STATE_DIR = ".workflow"


@dataclass
class StageRecord:
    stage: str
    input_hash: str
    digest: str  # of what the stage produced
    outputs: dict[str, str]
    seconds: float
    run_id: str | None = None  # the stage's MLflow run, if it has one
    metrics: dict[str, float] = field(default_factory=dict)


def manifest_path(root: Path, stage: str) -> Path:
    return root / STATE_DIR / f"{stage}.json"


def read_record(root: Path, stage: str) -> StageRecord | None:
    path = manifest_path(root, stage)
    try:
        return StageRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # missing or unreadable: the stage runs again


def outputs_present(record: StageRecord) -> bool:
    """Every output of the stage is still there (a path, or a URI such as s3://bucket/shards)."""
    return all(exists(p) for p in record.outputs.values() if p)


def write_record(root: Path, record: StageRecord) -> None:
    atomic_write_json(manifest_path(root, record.stage), asdict(record))
