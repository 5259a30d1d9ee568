"""Sources → url lists, as Ray Data stages (SPEC §5).

Every reader turns its files into rows (url, caption, source, drop) where ``drop`` names the rule that rejects the
row (or is empty). One shared stage then cleans captions, applies the rules, removes duplicate URLs (hash shuffle
on the url), shuffles with a fixed seed, adds a stable key (sha1 of the url) and writes parquet parts plus a report
with a count per rule. Formats:

- ``cc3m``: TSV ``caption<TAB>url``, no header.
- ``cc12m``: TSV ``url<TAB>caption`` with a header line.
- ``redcaps``: per-subreddit annotation JSON files (``annotations[].url/caption``), or zips of them.
- ``yfcc14m``: OpenAI's subset list (photo ids) joined with the YFCC100M metadata TSV; caption = description,
  URL-unquoted, HTML stripped; captions under 2 words dropped.
- ``table``: any parquet/CSV file with named url and caption columns.
"""
from __future__ import annotations

import glob
import html
import io
import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote_plus, urlsplit

import numpy as np
import pandas as pd
import ray

from pgseg.config import ConfigError
from pgseg.fileio import atomic_write_json
from pipelines.digest import url_key

log = logging.getLogger(__name__)

KINDS = ("cc3m", "cc12m", "redcaps", "yfcc14m", "table")
RULES = ("malformed", "empty_caption", "bad_url", "short_caption", "duplicate_url")
COLUMNS = ["url", "caption", "source", "drop"]
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


@dataclass
class SourceSpec:
    """One source: its format, its files (globs allowed) and, for some formats, where its fields are."""

    kind: str
    paths: list[str]
    name: str | None = None  # the `source` column; default: the kind
    url_column: str = "url"  # table
    caption_column: str = "caption"  # table
    yfcc_metadata: list[str] = field(default_factory=list)  # yfcc14m: the YFCC100M metadata TSV(s)
    # yfcc14m: 0-based columns of the metadata TSV (YFCC100M's documented order) and of the subset list
    yfcc_id_column: int = 0
    yfcc_description_column: int = 7
    yfcc_url_column: int = 14
    yfcc_marker_column: int = 22  # 0 = photo, 1 = video (videos are dropped as malformed rows)
    subset_id_column: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"sources.kind: {self.kind!r} is unknown (use one of {', '.join(KINDS)})")
        if not self.paths:
            raise ConfigError(f"sources.paths: source {self.label} has no paths")
        if self.kind == "yfcc14m" and not self.yfcc_metadata:
            raise ConfigError(f"sources.yfcc_metadata: source {self.label} (yfcc14m) needs the YFCC100M metadata TSV")

    @property
    def label(self) -> str:
        return self.name or self.kind


def expand(paths: list[str]) -> list[str]:
    """Globs and folders → sorted files; a pattern that matches nothing is an error naming it."""
    out: list[str] = []
    for pattern in paths:
        if Path(pattern).is_dir():
            files = sorted(str(f) for f in Path(pattern).rglob("*") if f.is_file())
        else:
            files = sorted(f for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"source path {pattern!r} matches no file")
        out += files
    return out


# ------------------------------------------------------------------------------------------------ readers
def _rows(url: Any, caption: Any, source: str, drop: str = "") -> dict[str, Any]:
    return {"url": url, "caption": caption, "source": source, "drop": drop}


def _tsv_lines(batch: pd.DataFrame, kind: str, source: str) -> pd.DataFrame:
    """read_text lines of CC3M / CC12M → rows; lines that do not have exactly two fields are malformed."""
    out = []
    for line in batch["text"]:
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if kind == "cc12m" and fields == ["url", "caption"]:
            continue  # the header
        if len(fields) != 2:
            out.append(_rows(None, None, source, "malformed"))
        elif kind == "cc3m":
            out.append(_rows(fields[1], fields[0], source))
        else:
            out.append(_rows(fields[0], fields[1], source))
    return pd.DataFrame(out, columns=COLUMNS)


def _redcaps_json(data: bytes, source: str) -> Iterator[dict[str, Any]]:
    try:
        annotations = json.loads(data)["annotations"]
        if not isinstance(annotations, list):
            raise TypeError("annotations is not a list")
    except (ValueError, KeyError, TypeError):
        yield _rows(None, None, source, "malformed")  # one count for an unreadable file
        return
    for a in annotations:
        if isinstance(a, dict) and "url" in a and "caption" in a:
            yield _rows(a["url"], a["caption"], source)
        else:
            yield _rows(None, None, source, "malformed")


def _redcaps_files(row: dict[str, Any], source: str) -> list[dict[str, Any]]:
    data, path = row["bytes"], row["path"]
    if path.endswith(".zip"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                return [r for n in sorted(zf.namelist()) if n.endswith(".json") for r in _redcaps_json(zf.read(n), source)]
        except zipfile.BadZipFile:
            return [_rows(None, None, source, "malformed")]
    return list(_redcaps_json(data, source))


def clean_yfcc_caption(description: str) -> str:
    """YFCC descriptions are URL-encoded HTML: unquote, strip tags, unescape entities, collapse spaces."""
    return _SPACE.sub(" ", html.unescape(_TAG.sub(" ", unquote_plus(description)))).strip()


def _yfcc_subset_ids(spec: SourceSpec) -> np.ndarray:
    ids = []
    for path in expand(spec.paths):
        for chunk in pd.read_csv(path, sep="\t", header=None, usecols=[spec.subset_id_column], dtype=str,
                                 chunksize=1_000_000, quoting=3, on_bad_lines="skip"):
            ids.append(pd.to_numeric(chunk[spec.subset_id_column], errors="coerce").dropna().astype(np.int64).to_numpy())
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def _yfcc_lines(batch: pd.DataFrame, spec: SourceSpec, ids: Any) -> pd.DataFrame:
    if isinstance(ids, ray.ObjectRef):
        ids = ray.get(ids)  # the sorted subset ids, shared through the object store (zero-copy)
    out = []
    need = max(spec.yfcc_id_column, spec.yfcc_description_column, spec.yfcc_url_column, spec.yfcc_marker_column)
    for line in batch["text"]:
        fields = line.rstrip("\r").split("\t")
        try:
            photo = int(fields[spec.yfcc_id_column])
        except (ValueError, IndexError):
            continue  # not a metadata row of the subset (header or garbage): not part of this source
        i = np.searchsorted(ids, photo)
        if i >= len(ids) or ids[i] != photo:
            continue  # outside OpenAI's subset
        if len(fields) <= need or fields[spec.yfcc_marker_column] != "0":
            out.append(_rows(None, None, spec.label, "malformed"))
            continue
        out.append(_rows(fields[spec.yfcc_url_column], clean_yfcc_caption(fields[spec.yfcc_description_column]),
                         spec.label))
    return pd.DataFrame(out, columns=COLUMNS)


def _table_rows(batch: pd.DataFrame, spec: SourceSpec) -> pd.DataFrame:
    for col in (spec.url_column, spec.caption_column):
        if col not in batch.columns:
            raise ValueError(f"source {spec.label}: no column {col!r} (columns: {', '.join(map(str, batch.columns))})")
    return pd.DataFrame({"url": batch[spec.url_column], "caption": batch[spec.caption_column],
                         "source": spec.label, "drop": ""}, columns=COLUMNS)


def read_source(spec: SourceSpec) -> ray.data.Dataset:
    """The rows of one source as a Ray dataset with columns url, caption, source, drop."""
    files = expand(spec.paths)
    if spec.kind in ("cc3m", "cc12m"):
        return ray.data.read_text(files).map_batches(_tsv_lines, fn_kwargs={"kind": spec.kind, "source": spec.label},
                                                     batch_format="pandas")
    if spec.kind == "redcaps":
        return ray.data.read_binary_files(files, include_paths=True).flat_map(_redcaps_files,
                                                                               fn_kwargs={"source": spec.label})
    if spec.kind == "yfcc14m":
        ids = ray.put(_yfcc_subset_ids(spec))  # ~14 M ids: one copy in the object store, not one per task
        return ray.data.read_text(expand(spec.yfcc_metadata)).map_batches(
            _yfcc_lines, fn_kwargs={"spec": spec, "ids": ids}, batch_format="pandas")
    readers = {".parquet": ray.data.read_parquet, ".csv": ray.data.read_csv}
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in readers:
        raise ValueError(f"source {spec.label}: table files must all be .parquet or all .csv, got {sorted(suffixes)}")
    return readers[suffixes.pop()](files).map_batches(_table_rows, fn_kwargs={"spec": spec}, batch_format="pandas")


# ------------------------------------------------------------------------------------------ the shared stage
def _is_http(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _apply_rules(batch: pd.DataFrame, min_words: dict[str, int]) -> pd.DataFrame:
    batch = batch.copy()
    caption = batch["caption"].where(batch["caption"].notna(), "").astype(str).str.replace(_SPACE, " ", regex=True).str.strip()
    batch["caption"] = caption
    batch["url"] = batch["url"].where(batch["url"].notna(), "").astype(str).str.strip()
    drop = batch["drop"].astype(str).copy()
    ok = drop == ""
    drop[ok & (caption == "")] = "empty_caption"
    ok = drop == ""
    drop[ok & ~batch["url"].map(_is_http)] = "bad_url"
    ok = drop == ""
    words = caption.str.split().str.len().fillna(0)
    need = batch["source"].map(lambda s: min_words.get(s, 1))
    drop[ok & (words < need)] = "short_caption"
    batch["drop"] = drop
    return batch


def _first_of_group(group: pd.DataFrame) -> pd.DataFrame:
    """One row per url (deterministic: the smallest (source, caption)); the rest are duplicates."""
    return group.sort_values(["source", "caption"], kind="stable").iloc[:1]


def _partial_counts(batch: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return batch.groupby(by, dropna=False).size().reset_index(name="n")


def count_by(ds: ray.data.Dataset, by: list[str]) -> pd.DataFrame:
    """Row counts per value of ``by``: per-batch counts in the map tasks, summed on the driver (no shuffle)."""
    parts = ds.map_batches(_partial_counts, fn_kwargs={"by": by}, batch_format="pandas").take_all()
    if not parts:
        return pd.DataFrame(columns=[*by, "n"])
    return pd.DataFrame(parts).groupby(by, dropna=False)["n"].sum().reset_index()


def _add_key(batch: pd.DataFrame) -> pd.DataFrame:
    batch = batch.drop(columns=["drop"])
    batch["key"] = [url_key(u) for u in batch["url"]]
    return batch


@dataclass
class SourcesReport:
    counts: dict[str, dict[str, int]]  # source → {read, <rule>…, written}
    total: dict[str, int]
    output: str
    parts: list[str]

    def text(self) -> str:
        lines = [f"{'source':<12}{'read':>10}" + "".join(f"{r:>15}" for r in RULES) + f"{'written':>10}"]
        for name, c in {**self.counts, "total": self.total}.items():
            lines.append(f"{name:<12}{c['read']:>10}" + "".join(f"{c[r]:>15}" for r in RULES) + f"{c['written']:>10}")
        return "\n".join(lines)


REPORT_FILE = "sources_report.json"


def foreign_files(out: Path) -> list[str]:
    """Files in ``out`` that an earlier url list there did not write (its report names its parts)."""
    if not out.exists():
        return []
    if not out.is_dir():
        return [out.name]
    owned = {REPORT_FILE}
    try:
        owned.update(json.loads((out / REPORT_FILE).read_text()).get("parts", []))
    except (OSError, ValueError, AttributeError):
        pass
    return sorted(p.name for p in out.iterdir() if p.name not in owned)


def check_url_list_out(out: Path, overwrite: bool) -> None:
    """Refuse (ValueError) an output folder holding what no earlier url list wrote, unless ``overwrite``."""
    foreign = foreign_files(out)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"{out} holds what this command did not write ({shown}): choose a new or empty folder, "
                         f"or add --overwrite to replace the folder")


def build_url_list(specs: list[SourceSpec], out_dir: str | Path, *, seed: int = 0,
                   rows_per_part: int = 1_000_000, overwrite: bool = False) -> SourcesReport:
    """Read, clean, deduplicate, shuffle and write the url list of ``specs`` to ``out_dir``, replaced atomically
    when it holds only an earlier url list; anything else there makes it refuse (ValueError) unless ``overwrite``."""
    if not specs:
        raise ValueError("no sources given")
    check_url_list_out(Path(out_dir), overwrite)
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two sources share the name {sorted({l for l in labels if labels.count(l) > 1})}: set name:")
    min_words = {s.label: 2 if s.kind == "yfcc14m" else 1 for s in specs}
    ds = read_source(specs[0])
    for spec in specs[1:]:
        ds = ds.union(read_source(spec))
    labelled = ds.map_batches(_apply_rules, fn_kwargs={"min_words": min_words}, batch_format="pandas").materialize()
    partitions = max(1, min(200, labelled.count() // 200_000))  # hash-shuffle width follows the data size
    counts = {label: {"read": 0, **{r: 0 for r in RULES}, "written": 0} for label in labels}
    for row in count_by(labelled, ["source", "drop"]).itertuples():
        counts[row.source]["read"] += int(row.n)
        if row.drop:
            counts[row.source][row.drop] += int(row.n)
    kept = labelled.map_batches(lambda b: b[b["drop"] == ""], batch_format="pandas")
    unique = kept.groupby("url", num_partitions=partitions).map_groups(_first_of_group, batch_format="pandas")
    final = unique.random_shuffle(seed=seed).map_batches(_add_key, batch_format="pandas").materialize()
    for row in count_by(final, ["source"]).itertuples():
        counts[row.source]["written"] = int(row.n)
    for c in counts.values():
        c["duplicate_url"] = c["read"] - sum(c[r] for r in RULES if r != "duplicate_url") - c["written"]
    out = Path(out_dir)
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    n_rows = max(final.count(), 1)
    final.repartition(max(1, -(-n_rows // rows_per_part))).write_parquet(str(staging))
    parts = []
    for i, part in enumerate(sorted(staging.glob("*.parquet"))):
        part.rename(staging / f"part-{i:05d}.parquet")
        parts.append(f"part-{i:05d}.parquet")
    total = {k: sum(c[k] for c in counts.values()) for k in ("read", *RULES, "written")}
    report = SourcesReport(counts, total, str(out), parts)
    atomic_write_json(staging / REPORT_FILE, {"counts": counts, "total": total, "parts": parts, "seed": seed})
    check_url_list_out(out, overwrite)  # (again: something may have landed there meanwhile)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    log.info("url list written to %s\n%s", out, report.text())
    return report
