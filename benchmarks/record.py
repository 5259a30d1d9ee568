"""A benchmark's results file: the commit it measured (and whether the working tree differed from it), and the
record written as indented JSON where ``python -m benchmarks.readme`` reads it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def commit_state() -> tuple[str, bool]:
    """(HEAD's commit, whether tracked files differ from it)."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    return commit, dirty


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """``record`` as JSON at ``path`` (its folder made), announced on stdout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return path
