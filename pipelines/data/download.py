"""Download: url list (parquet parts) → webdataset shards with img2dataset, resumable, with our own shard retries,
then a manifest aggregated from img2dataset's per-shard stats (SPEC §5).

img2dataset writes, per shard, ``{id}.tar``, ``{id}.parquet`` (status per sample) and ``{id}_stats.json`` — the
stats file is written last, so a shard is finished exactly when its stats exist. A re-run uses img2dataset's
incremental mode (finished shards are skipped); shards without stats after a run are retried by us (img2dataset's
Ray distributor does not retry). The manifest is written atomically and is what ingest uses to size epochs.
"""
from __future__ import annotations

import inspect
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray

from pgseg.config import ConfigError
from pipelines import storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# options we set ourselves; everything else of img2dataset.download is reachable through `options`
_OURS = {"url_list", "output_folder", "input_format", "output_format", "url_col", "caption_col",
         "save_additional_columns", "incremental_mode", "distributor", "enable_wandb"}


@dataclass
class DownloadSpec:
    """img2dataset settings; the defaults are the authors' recipe (512, keep_ratio, resize_only_if_bigger)."""

    image_size: int = 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    number_sample_per_shard: int = 10000
    processes_count: int = 2
    thread_count: int = 32
    timeout: int = 10
    distributor: str = "multiprocessing"  # or "ray" (needs the output folder on shared storage)
    shard_retries: int = 2  # our retry rounds for shards that did not finish
    shared_storage: bool = False  # the output folder is a mount every node sees (NFS, EFS, Lustre…)
    options: dict[str, Any] = field(default_factory=dict)  # any other img2dataset.download argument

    def __post_init__(self) -> None:
        if self.distributor not in ("multiprocessing", "ray"):
            raise ConfigError(f"download.distributor: must be 'multiprocessing' or 'ray', got {self.distributor!r}")
        for key in ("number_sample_per_shard", "image_size", "shard_retries"):
            if getattr(self, key) < (0 if key == "shard_retries" else 1):
                raise ConfigError(f"download.{key}: must be >= {0 if key == 'shard_retries' else 1}, "
                                  f"got {getattr(self, key)}")
        import img2dataset  # (here: it takes ~4 s to import, and this module is read by every training worker)

        allowed = set(inspect.signature(img2dataset.download).parameters) - _OURS
        for key in self.options:
            if key not in allowed:
                raise ConfigError(f"download.options.{key}: not an img2dataset option we pass through "
                                 f"(allowed: {', '.join(sorted(allowed))})")


def failure_kind(message: str) -> str:
    """img2dataset's per-sample error message → a short failure kind for the manifest."""
    text = message.lower()
    m = re.search(r"http error (\d{3})", text)
    if m:
        return f"http_{m.group(1)}"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "truncated" in text:
        return "truncated_image"
    if "cannot identify image" in text or "decod" in text or "not an image" in text:
        return "undecodable_image"  # HTML bodies and truncated JPEGs alike
    if "connection" in text or "refused" in text or "resolve" in text:
        return "connection"
    return "other: " + message[:80]


def _check_output_storage(output: str, spec: DownloadSpec) -> None:
    """The Ray distributor writes from every node: refuse a node-local folder on a multi-node cluster. An object
    store needs its fsspec filesystem (img2dataset writes through fsspec): s3fs for s3://, gcsfs for gs://."""
    if storage.is_uri(output):
        import fsspec

        try:
            fsspec.filesystem(output.split("://", 1)[0])
        except (ImportError, ValueError) as exc:
            raise ValueError(f"download output {output}: img2dataset cannot write there ({exc})") from None
    if spec.distributor != "ray" or spec.shared_storage or storage.is_uri(output):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise ValueError(f"download.distributor=ray on a {len(nodes)}-node cluster writes shards from every node, "
                         f"so {output} must be shared storage: use s3://… or gs://…, or, if it is a mount every "
                         f"node sees, say so with shared_storage=true (--shared-storage)")


def _expected_shards(url_list: Path, per_shard: int) -> int:
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(url_list.glob("*.parquet")))
    return -(-rows // per_shard) if rows else 0


def _stats_files(output: str) -> list[str]:
    return sorted(name for name in storage.files(output) if re.fullmatch(r"\d+_stats\.json", name))


def finished_shards(output: str | Path) -> set[int]:
    return {int(name.split("_")[0]) for name in _stats_files(str(output))}


def build_manifest(output: str | Path) -> dict[str, Any]:
    """Aggregate the per-shard stats and per-sample status files into the manifest dict."""
    shards, failures = [], Counter()
    total = successes = 0
    for name in _stats_files(str(output)):
        shard = name.split("_")[0]
        stats = json.loads(storage.read_bytes(storage.child(output, name)))
        count, ok = int(stats.get("count", 0)), int(stats.get("successes", 0))
        total += count
        successes += ok
        for message, n in (stats.get("status_dict") or {}).items():
            if message != "success":
                failures[failure_kind(message)] += int(n)
        shards.append({"shard": shard, "tar": f"{shard}.tar", "samples": ok, "attempted": count})
    return {
        "shards": shards,
        "num_shards": len(shards),
        "samples": successes,
        "attempted": total,
        "success_rate": successes / total if total else 0.0,
        "failures": dict(sorted(failures.items())),
    }


def write_manifest(output: str | Path, manifest: dict[str, Any]) -> str:
    return storage.write_json(storage.child(output, MANIFEST), manifest)


def _forget_listings(output: str) -> None:
    """img2dataset finds the finished shards by listing the output through fsspec, whose object-store filesystems
    are cached per process with their listings: a second download in this process (a retry round, a workflow run
    again) would see the listing of the first one's start and download every shard again."""
    if storage.is_uri(output):
        import fsspec

        fs, _ = fsspec.core.url_to_fs(output)
        fs.invalidate_cache()


def download(url_list: str | Path, output: str | Path, spec: DownloadSpec | None = None) -> dict[str, Any]:
    """Download the url list into webdataset shards under ``output`` (a folder or a folder URI such as
    ``s3://bucket/shards``); returns the manifest (also written there)."""
    import img2dataset  # (~4 s to import: only when downloading)

    spec = spec or DownloadSpec()
    output = str(output) if storage.is_uri(output) else str(Path(output).resolve())
    _check_output_storage(output, spec)
    url_list = Path(url_list)
    if not url_list.is_dir() or not list(url_list.glob("*.parquet")):
        raise FileNotFoundError(f"url list {url_list}: no parquet parts (run `pgseg data sources` first)")
    storage.writable(output, "download output")
    expected = _expected_shards(url_list, spec.number_sample_per_shard)
    kwargs = dict(
        url_list=str(url_list), output_folder=str(output), input_format="parquet", output_format="webdataset",
        url_col="url", caption_col="caption", save_additional_columns=["source"],
        incremental_mode="incremental", distributor=spec.distributor, enable_wandb=False,
        image_size=spec.image_size, resize_mode=spec.resize_mode, resize_only_if_bigger=spec.resize_only_if_bigger,
        number_sample_per_shard=spec.number_sample_per_shard, processes_count=spec.processes_count,
        thread_count=spec.thread_count, timeout=spec.timeout, **spec.options)
    for attempt in range(1 + spec.shard_retries):
        missing = expected - len(finished_shards(output))
        if missing <= 0:
            break
        # a manifest from an earlier run that left shards unfinished: img2dataset reads every *.json in the folder
        # as a shard's stats and fails on it; it is rebuilt from those stats below
        storage.remove(storage.child(output, MANIFEST))
        if attempt:
            log.warning("download: %d shard(s) did not finish; retry %d of %d", missing, attempt, spec.shard_retries)
        _forget_listings(output)
        try:
            img2dataset.download(**kwargs)
        except (ValueError, TypeError):  # a bad option, not a failed shard: retrying cannot help
            raise
        except Exception as exc:  # noqa: BLE001 - counted and retried; reported below if it persists
            log.warning("download: img2dataset stopped with %s: %s", type(exc).__name__, exc)
    manifest = build_manifest(output)
    manifest["expected_shards"] = expected
    manifest["unfinished_shards"] = sorted(set(range(expected)) - finished_shards(output))
    write_manifest(output, manifest)
    if manifest["unfinished_shards"]:
        raise RuntimeError(f"download: shards {manifest['unfinished_shards']} did not finish after "
                           f"{spec.shard_retries} retries (manifest written to {storage.child(output, MANIFEST)})")
    return manifest


def manifest_of(source: str | Path) -> str | None:
    """The manifest ``source`` names: itself (a ``manifest.json``) or the one in the folder it names; None if
    neither (a folder or glob of bare tars)."""
    source = str(source)
    if source.rstrip("/").endswith("/" + MANIFEST) or source == MANIFEST:
        return source if storage.is_file(source) else None
    if "*" in source or "?" in source:
        return None
    inside = storage.child(source, MANIFEST)
    return inside if storage.is_file(inside) else None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A shard set's manifest, from the folder (or folder URI) holding it or its own path."""
    found = manifest_of(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no shard manifest (run `pgseg data download` first)")
    try:
        return json.loads(storage.read_bytes(found))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{found}: not a valid manifest ({exc})") from None


__all__ = ["DownloadSpec", "build_manifest", "download", "failure_kind", "manifest_of", "read_manifest"]
