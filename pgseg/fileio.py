"""Atomic file writes: write to a temporary name in the same folder, then rename (readers never see half a file)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def writable_folder(path: str | Path, what: str = "folder") -> Path:
    """``path`` exists as a folder (made if missing) that this process can write; ValueError naming ``what`` and
    the problem otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".pgseg-write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot write there ({exc.strerror})") from None
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` into ``path`` whole or not at all; the file gets the mode any new file gets (0666 less the umask),
    not the private 0600 of a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def json_bytes(data: Any) -> bytes:
    """How our JSON files are written (indented, keys sorted)."""
    return json.dumps(data, indent=2, sort_keys=True).encode()


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_bytes(path, json_bytes(data))
