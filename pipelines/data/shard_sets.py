"""Shard sets downloaded elsewhere (img2dataset output, public webdataset mirrors) as a training source: their tars
stay where they are (a folder, a glob, or a folder URI pyarrow reads: ``file://``, ``s3://``, ``gs://``); ``pgseg data
import`` validates them by sampling and writes our manifest, whose shard entries point at them and which names the key
mapping, so training reads and mixes them like our own downloads.

The key mapping says where a sample's image and caption are: the image under the first of some extensions (``jpg``,
``png``, ``webp``…), the caption under an extension (``txt``) or in a field of the sample's JSON (``json:caption``).
Ingest applies it per shard (:func:`canonical`), so each sample reaches the trainer as ``jpg`` + ``txt``.
"""
from __future__ import annotations

import glob
import io
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from pgseg.fileio import atomic_write_json
from pipelines.data.download import MANIFEST
from pipelines.data.tar_reader import DAMAGED_TAR, IMAGE_KEYS, tar_samples
from pipelines.storage import filesystem


@dataclass(frozen=True)
class KeyMap:
    """Where the image and the caption of a sample are (see the module docs)."""

    image: tuple[str, ...] = IMAGE_KEYS
    caption: str = "txt"

    @classmethod
    def parse(cls, image: str | None, caption: str | None) -> "KeyMap":
        """From the command line's ``--image-keys jpg,webp`` and ``--caption txt | json:FIELD`` (ValueError naming
        the bad one)."""
        keys = tuple(k.strip().lower().lstrip(".") for k in (image or ",".join(IMAGE_KEYS)).split(","))
        if not all(k and k.replace("_", "").isalnum() for k in keys):
            raise ValueError(f"--image-keys {image!r}: expected extensions separated by commas, e.g. jpg,png,webp")
        caption = (caption or "txt").strip()
        ext, sep, field = caption.partition(":")
        if not ext or not ext.replace("_", "").isalnum() or (sep and (ext.lower() != "json" or not field)):
            raise ValueError(f"--caption {caption!r}: expected an extension (txt) or json:FIELD (json:caption)")
        return cls(keys, f"json:{field}" if sep else ext.lower())

    @classmethod
    def of(cls, recorded: dict[str, Any] | None) -> "KeyMap":
        return cls() if not recorded else cls(tuple(recorded["image"]), recorded["caption"])

    def is_default(self) -> bool:
        return self == KeyMap()

    def caption_of(self, sample: dict[str, Any]) -> bytes | None:
        ext, _, field = self.caption.partition(":")
        data = sample.get(ext)
        if not isinstance(data, (bytes, bytearray)) or not field:
            return data or None
        try:
            value = json.loads(data).get(field)
        except (ValueError, AttributeError):
            return None
        return value.encode() if isinstance(value, str) and value.strip() else None

    def image_of(self, sample: dict[str, Any]) -> bytes | None:
        return next((sample[k] for k in self.image if isinstance(sample.get(k), (bytes, bytearray)) and sample[k]),
                    None)


def canonical(sample: dict[str, Any], keys: KeyMap) -> dict[str, Any]:
    """A sample as ingest reads ours: its image under ``jpg`` and its caption under ``txt`` (errors pass through)."""
    if "__error__" in sample or keys.is_default():
        return sample
    out = {k: sample[k] for k in ("__key__", "__url__") if k in sample}
    image, caption = keys.image_of(sample), keys.caption_of(sample)
    if image is not None:
        out["jpg"] = image
    if caption is not None:
        out["txt"] = caption
    return out


# ------------------------------------------------------------------------------------------------ finding the tars
def find_tars(source: str) -> list[str]:
    """The tars of ``source``: a folder or folder URI (its ``*.tar``, sorted) or a local glob; as paths or URIs."""
    import pyarrow.fs as pafs

    if "://" not in source and glob.has_magic(source):
        return sorted(str(Path(p).resolve()) for p in glob.glob(source) if p.endswith(".tar"))
    fs, path = filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{source}: no such folder")
    if info.type == pafs.FileType.File:
        return [source]
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.path.endswith(".tar"))
    if "://" in source:
        scheme = source.split("://", 1)[0]
        return [f"{scheme}://{p.lstrip('/')}" if scheme != "file" else f"file://{p}" for p in found]
    return found


def _open(tar: str) -> Any:
    fs, path = filesystem(tar)
    return fs.open_input_stream(path)


def _stats_count(tar: str) -> int | None:
    """img2dataset's own count of a shard's samples (its ``NNNNN_stats.json`` beside the tar), if there."""
    stats = tar[:-len(".tar")] + "_stats.json"
    try:
        with _open(stats) as f:
            return int(json.loads(f.read()).get("successes"))
    except (OSError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------ validation
@dataclass
class ShardCheck:
    tar: str
    samples: int = 0  # with an image and a caption under the mapping
    members: int = 0  # samples of any kind
    decoded: int = 0
    undecodable: int = 0
    damaged: bool = False
    extensions: tuple[str, ...] = ()


def check_shard(tar: str, keys: KeyMap, decode: int) -> ShardCheck:
    """Read one tar whole: samples usable under ``keys``, and the first ``decode`` images opened with PIL."""
    check, seen = ShardCheck(tar), set()
    with _open(tar) as stream:
        for sample in tar_samples(stream, tar):
            if sample.get("__error__") == DAMAGED_TAR:
                check.damaged = True
                continue
            if "__error__" in sample:
                continue
            check.members += 1
            seen.update(k for k in sample if not k.startswith("__"))
            image, caption = keys.image_of(sample), keys.caption_of(sample)
            if image is None or caption is None:
                continue
            check.samples += 1
            if check.decoded + check.undecodable < decode:
                try:
                    with Image.open(io.BytesIO(image)) as picture:
                        picture.load()
                    check.decoded += 1
                except Exception:  # noqa: BLE001 - whatever PIL raises, the image is not usable
                    check.undecodable += 1
    check.extensions = tuple(sorted(seen))
    return check


def _evenly(items: list[str], count: int) -> list[str]:
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def import_shards(source: str, out: str | Path, keys: KeyMap = KeyMap(), *, sample_shards: int = 8,
                  decode: int = 16, overwrite: bool = False) -> dict[str, Any]:
    """Validate the shard set at ``source`` (``sample_shards`` tars read whole, spread over the set; ``decode`` images
    of each opened) and write our manifest for it into ``out``. Counts: img2dataset's stats where they are, the
    sampled tars' own counts, else the sampled mean (the manifest says which). ValueError names what is wrong."""
    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise ValueError(f"{out / MANIFEST} exists: choose another --out, or --overwrite to replace it")
    if sample_shards < 1 or decode < 0:
        raise ValueError("--sample-shards must be at least 1 and --decode at least 0")
    tars = find_tars(source)
    if not tars:
        raise FileNotFoundError(f"{source}: no .tar shards there")
    checks = {t: check_shard(t, keys, decode) for t in _evenly(tars, sample_shards)}
    for check in checks.values():
        name = posixpath.basename(check.tar)
        if check.members == 0:
            raise ValueError(f"{name}: no samples in it" + (" (a damaged tar)" if check.damaged else ""))
        if check.samples == 0:
            raise ValueError(f"{name}: none of its {check.members} samples has an image under "
                             f"{','.join(keys.image)} and a caption under {keys.caption}; its samples have "
                             f"{', '.join(check.extensions)} (set --image-keys and --caption, e.g. --caption json:caption)")
    opened = sum(c.decoded + c.undecodable for c in checks.values())
    undecodable = sum(c.undecodable for c in checks.values())
    if opened and undecodable > opened // 2:
        raise ValueError(f"{source}: {undecodable} of {opened} sampled images do not decode: not an image set PIL reads")
    mean = sum(c.samples for c in checks.values()) / len(checks)
    shards, counted = [], {"stats": 0, "read": 0, "estimated": 0}
    for tar in tars:
        if tar in checks:
            samples, how = checks[tar].samples, "read"
        else:
            stats = _stats_count(tar) if keys.is_default() else None
            samples, how = (stats, "stats") if stats is not None else (round(mean), "estimated")
        counted[how] += 1
        shards.append({"shard": posixpath.basename(tar)[:-len(".tar")], "tar": tar, "samples": samples,
                       "attempted": samples, "count": how})
    total = sum(s["samples"] for s in shards)
    manifest = {
        "shards": shards, "num_shards": len(shards), "samples": total, "attempted": total, "success_rate": 1.0,
        "failures": {}, "source": source, "imported": True, "keys": {"image": list(keys.image), "caption": keys.caption},
        "counts": counted,
        "validation": {"shards_read": len(checks), "samples_read": sum(c.samples for c in checks.values()),
                       "samples_without_image_or_caption": sum(c.members - c.samples for c in checks.values()),
                       "images_opened": opened, "images_undecodable": undecodable,
                       "damaged_shards": sorted(posixpath.basename(c.tar) for c in checks.values() if c.damaged)},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def same_file(path: str) -> str:
    """One spelling of a shard's location, whichever way it is written (``/d/a.tar``, ``file:///d/a.tar``; an
    ``s3://b/a.tar`` that Ray Data hands its reader as ``b/a.tar``)."""
    return path.split("://", 1)[-1].lstrip("/")


def mapped_samples(stream: Any, url: str, keys: KeyMap | None) -> Iterator[dict[str, Any]]:
    """The samples of a tar (:func:`~pipelines.data.tar_reader.tar_samples`) as ingest reads ours."""
    for sample in tar_samples(stream, url):
        yield sample if keys is None else canonical(sample, keys)


__all__ = ["KeyMap", "canonical", "find_tars", "import_shards", "mapped_samples", "same_file"]
