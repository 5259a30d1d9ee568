"""Content hashes, one helper each: of a JSON-able value (a stage's inputs, a sweep's state), of a file, of a folder's
(or an object-store prefix's) names and sizes, and the key of a url (the sample key in url lists and shards)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def value_digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (keys sorted; anything else as its text)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(root: str | Path) -> str:
    """Names and sizes of every file under ``root``, a folder or a folder URI (cheap on shard folders; contents
    are pinned by the inputs)."""
    from pipelines.storage import files

    return value_digest(sorted(files(root, recursive=True).items()))


def url_key(url: str) -> str:
    """The 16-hex-digit key of a url: the same url gets the same key in every url list."""
    return hashlib.sha1(url.encode()).hexdigest()[:16]
