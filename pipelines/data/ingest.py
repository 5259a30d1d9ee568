"""Ingest: webdataset shards → Ray Data → decoded, augmented, tokenised batches for Ray Train workers.

``ray.data`` reading of the tars with ``pipelines/data/tar_reader.py`` (a truncated or unreadable tar gives every
sample before the break, then one counted error, instead of failing the run) → ``map_batches`` (decode, RandomResizedCrop with scale (min_scale, 1), horizontal flip,
ImageNet normalisation, CLIP tokenisation) → ``iter_torch_batches`` in the workers. Bad samples are dropped inside
the map (so every batch has exactly the batch size, which the global-batch loss needs) and counted by a small
actor, exactly: undecodable image bytes, a sample without caption, a sample without image, a damaged tar, a key
that repeats in a tar.
"""
from __future__ import annotations

import io
import logging
import random
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
from PIL import Image, UnidentifiedImageError

import torchvision.transforms.v2.functional as TF

from ray.data.datasource import FileBasedDatasource
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pgseg.text import IMAGENET_TEMPLATES, NounVocabulary, noun_prompt_ids, tokenize
from pipelines import storage
from pipelines.data.download import MANIFEST, manifest_of, read_manifest
from pipelines.data.shard_sets import KeyMap, find_tars, mapped_samples, same_file
from pipelines.data.tar_reader import DAMAGED_TAR, IMAGE_KEYS, REPEATED_KEY, TEXT_KEYS

log = logging.getLogger(__name__)

SKIP_KINDS = ("bad_image", "no_caption", "no_image", DAMAGED_TAR, REPEATED_KEY)
READ_ROWS = 512  # samples per block handed on by a read task
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# ------------------------------------------------------------------------------------------------ shard lists
def _located(manifest: str, tar: str) -> str:
    """A manifest's shard: beside the manifest (our downloads), or where an imported set keeps it (path or URI)."""
    if storage.is_uri(tar) or Path(tar).is_absolute():
        return tar
    return storage.child(manifest[:-len(MANIFEST)].rstrip("/") or ".", tar)


def key_maps(sources: list[str]) -> dict[str, KeyMap]:
    """The key mapping of each shard of an imported set among ``sources`` (by :func:`same_file`); ours need none."""
    out: dict[str, KeyMap] = {}
    for src in sources:
        found = manifest_of(src)
        if found is not None:
            manifest = read_manifest(found)
            keys = KeyMap.of(manifest.get("keys"))
            if not keys.is_default():
                out.update({same_file(_located(found, s["tar"])): keys for s in manifest["shards"]})
    return out


def shard_list(sources: list[str]) -> list[str]:
    """Tar paths (or URIs) from globs, folders and folder URIs (their manifest's shards, else every tar) and
    manifest files."""
    out: list[str] = []
    for src in sources:
        found = manifest_of(src)
        if found is not None:
            out += [_located(found, s["tar"]) for s in read_manifest(found)["shards"] if s["samples"] > 0]
            continue
        try:
            out += find_tars(src)
        except FileNotFoundError:
            pass  # said below, with every source
    if not out:
        raise FileNotFoundError(f"no shards found in {sources}")
    return out


def manifest_samples(sources: list[str]) -> int | None:
    """Samples per epoch from the shard manifests of ``sources`` (None when a source has no manifest)."""
    total = 0
    for src in sources:
        found = manifest_of(src)
        if found is None:
            return None
        total += int(read_manifest(found)["samples"])
    return total


def pass_shards(sources: list[list[str]], weights: list[float] | None, pass_index: int, seed: int) -> list[str]:
    """The shard order of one pass over the data, drawn from (seed, pass): a new order every pass. With weights,
    each source gives a share of the pass's shards in proportion to its weight (as many shards in all as the sources
    hold); a source walks through its shards in seeded permutations, one after the other, so over the run each of
    its shards is read equally often (a source smaller than its share repeats shards within a pass)."""
    order = random.Random(f"pass/{seed}/{pass_index}")  # a str seed hashes the same in every process
    if weights is None or len(sources) == 1:
        shards = [s for group in sources for s in group]
        order.shuffle(shards)
        return shards
    total = sum(len(g) for g in sources)
    out: list[str] = []
    for g, (group, w) in enumerate(zip(sources, weights)):
        share = max(1, round(total * w / sum(weights)))
        cycles: dict[int, list[str]] = {}
        for i in range(pass_index * share, (pass_index + 1) * share):
            cycle, at = divmod(i, len(group))
            if cycle not in cycles:
                cycles[cycle] = random.Random(f"source/{seed}/{g}/{cycle}").sample(group, len(group))
            out.append(cycles[cycle][at])
    order.shuffle(out)
    return out


# ------------------------------------------------------------------------------------------------- reading
class TarShards(FileBasedDatasource):
    """Tar shards as rows of samples for Ray Data (``_read_stream`` is FileBasedDatasource's extension point)."""

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths: list[str], keys: dict[str, KeyMap] | None = None):
        super().__init__(paths)
        self.keys = keys or {}  # imported sets' shards: where their image and caption are

    def _read_stream(self, stream: Any, path: str):
        rows: list[dict[str, Any]] = []
        for sample in mapped_samples(stream, path, self.keys.get(same_file(path))):
            rows.append(sample)
            if len(rows) == READ_ROWS:
                yield pd.DataFrame.from_records(rows)
                rows = []
        if rows:
            yield pd.DataFrame.from_records(rows)


# ------------------------------------------------------------------------------------------------- counting
@ray.remote(num_cpus=0)
class SkipCounter:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def totals(self) -> dict[str, int]:
        return {k: int(self.counts.get(k, 0)) for k in SKIP_KINDS}


# ------------------------------------------------------------------------------------- decode and augment
def _first(row: pd.Series, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in row.index and isinstance(row[k], (bytes, bytearray)) and len(row[k]) > 0:
            return row[k]
    return None


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float], rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop), on a PIL image."""
    width, height = image.size
    area = width * height
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w, h = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    side = min(width, height)
    return TF.resized_crop(image, (height - side) // 2, (width - side) // 2, side, side, [size, size], antialias=True)


def preprocess_image(data: bytes, size: int, min_scale: float, train: bool, rng: np.random.Generator) -> np.ndarray:
    """Image bytes → [3, size, size] float32: RandomResizedCrop + flip in training (resize otherwise), ImageNet
    normalisation. Raises on undecodable bytes."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if train:
            im = random_resized_crop(im, size, (min_scale, 1.0), rng)
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(im, np.float32) / 255.0
    return ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)  # [3, S, S]


class Preprocess:
    """The map_batches UDF: bytes → normalised CHW float32 images and CLIP tokens (and, for GroupViT's multi-label
    loss, K noun prompts per caption); bad rows dropped and counted."""

    def __init__(self, img_size: int, context_length: int, min_scale: float, counter: Any, train: bool = True,
                 multi_label: int = 0, noun_vocabulary: str | None = None, seed: tuple[int, ...] | None = None):
        self.img_size, self.context_length, self.min_scale = img_size, context_length, min_scale
        self.counter, self.train = counter, train
        self.multi_label, self.noun_vocabulary, self.seed = multi_label, noun_vocabulary, seed
        self.rng: np.random.Generator | None = None  # made in the worker: every task gets its own stream
        self.vocabulary = None

    def _image(self, data: bytes) -> np.ndarray:
        return preprocess_image(data, self.img_size, self.min_scale, self.train, self.rng)

    def _nouns(self, captions: list[str], rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """K noun prompts per caption as tokens [B, K, L], and each prompt's noun id [B, K] (-1: the caption)."""
        if self.vocabulary is None:
            self.vocabulary = NounVocabulary.from_file(self.noun_vocabulary)
        pairs = [p for c in captions for p in noun_prompt_ids(c, self.vocabulary, self.multi_label,
                                                              IMAGENET_TEMPLATES, rng)]
        tokens = tokenize([p for p, _ in pairs], self.context_length).numpy()
        ids = np.array([i for _, i in pairs], np.int64).reshape(len(captions), self.multi_label)
        return tokens.reshape(len(captions), self.multi_label, -1), ids

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        if self.seed is not None:  # reproducible: the stream follows the batch's own keys, not the task
            keys = "".join(str(k) for k in batch.get("__key__", pd.Series(dtype=object)).tolist())
            self.rng = np.random.default_rng([*self.seed, zlib.crc32(keys.encode())])
        elif self.rng is None:
            self.rng = np.random.default_rng()
        skips: Counter[str] = Counter()
        images, captions = [], []
        for _, row in batch.iterrows():
            if "__error__" in row.index and isinstance(row["__error__"], str):
                skips[row["__error__"]] += 1
                continue
            data, text = _first(row, IMAGE_KEYS), _first(row, TEXT_KEYS)
            if data is None:
                skips["no_image"] += 1
                continue
            caption = text.decode("utf-8", "replace").strip() if text is not None else ""
            if not caption:
                skips["no_caption"] += 1
                continue
            try:
                images.append(self._image(data))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
                skips["bad_image"] += 1
                continue
            captions.append(caption)
        if skips:
            ray.get(self.counter.add.remote(dict(skips)))  # exact: counted before this batch is handed on
        s, length = self.img_size, self.context_length
        out = {
            "image": np.stack(images) if images else np.zeros((0, 3, s, s), np.float32),
            "tokens": tokenize(captions, length).numpy() if captions else np.zeros((0, length), np.int64),
        }
        if self.multi_label > 0:
            rng = random.Random(int(self.rng.integers(2**63)))
            if captions:
                out["nouns"], out["noun_ids"] = self._nouns(captions, rng)
            else:
                out["nouns"] = np.zeros((0, self.multi_label, length), np.int64)
                out["noun_ids"] = np.zeros((0, self.multi_label), np.int64)
        return out


@dataclass
class Ingest:
    """One training data source for Ray Train: ``dataset(pass_index)`` for each pass over the data (its shard order
    and, when deterministic, its augmentation drawn from (seed, pass)), ``skips()`` for the logs."""

    sources: list[list[str]]
    img_size: int
    context_length: int
    min_scale: float = 0.08
    weights: list[float] | None = None
    seed: int = 0
    train: bool = True  # random crops and flips (False: resize only)
    multi_label: int = 0  # K noun prompts per caption (GroupViT's multi-label loss)
    noun_vocabulary: str | None = None
    deterministic: bool = False  # seeded augmentation (per batch of keys) and ordered reading

    keys: dict[str, KeyMap] | None = None  # the key mapping of imported sets' shards (see shard_sets)

    def __post_init__(self) -> None:
        # on the creating process's node (the driver's, or a sweep trial's): an actor placed on a worker node would
        # take the counts, and every later data task and report, down with that node (an elastic run loses nodes)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.counter = SkipCounter.options(scheduling_strategy=here).remote()

    @classmethod
    def from_paths(cls, paths: list[str], **kw: Any) -> "Ingest":
        return cls([shard_list([p]) for p in paths], keys=key_maps(paths), **kw)

    def dataset(self, pass_index: int = 0) -> ray.data.Dataset:
        shards = pass_shards(self.sources, self.weights, pass_index, self.seed)  # augmented or not
        ds = ray.data.read_datasource(TarShards(shards, self.keys))
        udf = Preprocess(self.img_size, self.context_length, self.min_scale, self.counter, self.train,
                         self.multi_label, self.noun_vocabulary, (self.seed, pass_index) if self.deterministic else None)
        ds = ds.map_batches(udf, batch_format="pandas", batch_size=256)
        if self.deterministic:  # blocks in the order of the shard list, whichever task finished first
            ds.context.execution_options.preserve_order = True
        return ds

    def skips(self) -> dict[str, int]:
        return ray.get(self.counter.totals.remote())
