"""Where the platform's files live: a local path or a URI of a filesystem pyarrow opens (``s3://``, ``gs://``,
``file://``, ``hdfs://``), so shard sets, manifests and runs can sit in object storage on a cluster. Credentials and
endpoints come from the environment and the standard AWS/GCP configuration, never from our configs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pgseg.fileio import atomic_write_bytes, json_bytes, writable_folder


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def filesystem(location: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local path (made absolute) or a URI."""
    import pyarrow.fs as pafs

    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def child(location: str | Path, name: str) -> str:
    """``name`` inside the folder ``location`` (a URI stays a URI)."""
    return f"{str(location).rstrip('/')}/{name}" if is_uri(location) else str(Path(location) / name)


def _kind(location: str | Path) -> str:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "folder"}.get(kind, "none")


def is_file(location: str | Path) -> bool:
    return _kind(location) == "file"


def exists(location: str | Path) -> bool:
    return _kind(location) != "none"


def files(folder: str | Path, recursive: bool = False) -> dict[str, int]:
    """The files under ``folder`` (its direct ones unless ``recursive``): path relative to it → size in bytes;
    empty when there is no such folder."""
    import pyarrow.fs as pafs

    fs, path = filesystem(folder)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    base = path.rstrip("/") + "/"
    return {i.path[len(base):]: i.size for i in fs.get_file_info(selector) if i.type == pafs.FileType.File}


def holds_anything(folder: str | Path) -> bool:
    """The folder (or prefix) has a file or a folder in it."""
    import pyarrow.fs as pafs

    fs, path = filesystem(folder)
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str | Path, data: bytes) -> str:
    """Write a file whole or not at all: locally through a rename, on an object store as one object (published only
    when it is complete)."""
    if not is_uri(location):
        return str(atomic_write_bytes(location, data))
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)
    return str(location)


def write_json(location: str | Path, data: Any) -> str:
    """``data`` as our JSON files are written, whole or not at all (:func:`write_bytes`)."""
    return write_bytes(location, json_bytes(data))


def remove(location: str | Path) -> None:
    """Delete a file if it is there."""
    fs, path = filesystem(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def writable(location: str | Path, what: str = "folder") -> str:
    """``location`` is a folder (made if missing) or an object-store prefix this process can write: a ValueError
    naming ``what`` and the problem otherwise (a bucket that does not exist, no credentials, no permission)."""
    if not is_uri(location):
        return str(writable_folder(location, what))
    probe = child(location, f".pgseg-write-check-{os.getpid()}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except OSError as exc:
        raise ValueError(f"{what} {location}: cannot write there ({str(exc).splitlines()[0]})") from None
    return str(location)
