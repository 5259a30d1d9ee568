"""A procedurally generated world of shapes for the quickstart and the tests (SHAPES_WORLD_NOTES.md).

Image–caption pairs: 1–3 shapes of K classes on a textured background; captions from varied templates name exactly
the classes that are visible. A VOC-format validation set with exact masks: ``JPEGImages/``, ``SegmentationClass/``
(palette PNGs, 0 = background, 255 unused), ``ImageSets/Segmentation/val.txt``, ``class_names.txt``.

Designed to be learnable by a small model on a CPU in minutes (the notes' findings): few classes, large objects
(radius 0.15–0.27 of the image side), each class with its own colour family most of the time (``colour_tie``),
low-contrast backgrounds. Everything is deterministic by seed: image ``i`` uses its own generator seeded from
(seed, split, i), so the bytes do not depend on the order or the number of workers.
"""
from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm import tqdm

from pgseg.fileio import atomic_write_bytes
from pgseg.visualize import PALETTE as VOC_PALETTE
from pipelines.data.download import download
from pipelines.data.file_server import serve_directory
from pipelines.digest import url_key

ALL_CLASSES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
# hue (degrees) of each class's colour family
HUES = {"circle": 0, "square": 120, "triangle": 220, "star": 55, "hexagon": 290, "diamond": 170, "cross": 30,
        "heart": 330}
TEMPLATES_ONE = ("a photo of a {}.", "a {} on a textured background.", "there is a {} in the picture.",
                 "a picture showing a {}.", "a single {}.")
TEMPLATES_MANY = ("a photo of {}.", "{} on a textured background.", "there are {} in the picture.",
                  "a picture showing {}.", "{} together.")
# with ``caption_background``: every caption also names the stuff around the shapes, as real captions name the
# grass or the sky ("background" then is one of the world's nouns)
TEMPLATES_ONE_BG = ("a photo of a {} on a background.", "a {} on a textured background.",
                    "a background with a {} in front.", "a picture showing a {} and the background.",
                    "a single {} against a background.")
TEMPLATES_MANY_BG = ("a photo of {} on a background.", "{} on a textured background.",
                     "a background with {} in front.", "a picture showing {} and the background.",
                     "{} together against a background.")
BACKGROUND_NOUN = "background"
# "dev" is held out for picking a checkpoint during training; "val" is what results are reported on
SPLITS = {"train": 0, "val": 1, "dev": 3}
MIN_VISIBLE = 0.5  # every drawn shape keeps at least half of its pixels


@dataclass
class ShapeSample:
    image: Image.Image  # RGB
    mask: np.ndarray  # [H, W] uint8
    names: list[str]  # class of each drawn shape
    background: np.ndarray  # [H, W, 3] the layer under the shapes


@dataclass
class ShapesWorld:
    num_classes: int = 6
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    min_radius: float = 0.15
    max_radius: float = 0.27
    colour_tie: float = 0.8
    background_tint: float = 1.0  # how coloured the textured background may be (0 = grey)
    caption_background: bool = False  # every caption names the background too
    seed: int = 0
    classes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(ALL_CLASSES):
            raise ValueError(f"num_classes must be in [1, {len(ALL_CLASSES)}], got {self.num_classes}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_radius <= self.max_radius < 0.5:
            raise ValueError(f"need 0 < min_radius <= max_radius < 0.5, got {self.min_radius}, {self.max_radius}")
        if not 0 <= self.background_tint <= 1:
            raise ValueError(f"background_tint must be in [0, 1], got {self.background_tint}")
        if not 0 <= self.colour_tie <= 1:
            raise ValueError(f"colour_tie must be in [0, 1], got {self.colour_tie}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        self.classes = ALL_CLASSES[: self.num_classes]

    # ----------------------------------------------------------------------------------------------- drawing
    def _rng(self, split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[split], index])

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        s = self.image_size
        base = rng.uniform(90, 170, size=3)
        base = base.mean() + self.background_tint * (base - base.mean())  # 0: grey, 1: tinted
        yy, xx = np.mgrid[0:s, 0:s] / s
        angle, freq = rng.uniform(0, math.pi), rng.uniform(2, 6)
        stripes = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
        noise = rng.normal(0, 6, size=(s, s, 3))
        weights = rng.uniform(0.3, 1.0, size=3)
        weights = weights.mean() + self.background_tint * (weights - weights.mean())
        img = base + 14 * stripes[..., None] * weights + noise
        return np.clip(img, 0, 255).astype(np.uint8)

    def _colour(self, rng: np.random.Generator, name: str) -> tuple[int, int, int]:
        hue = HUES[name] + rng.uniform(-15, 15) if rng.random() < self.colour_tie else rng.uniform(0, 360)
        sat, val = rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)
        r, g, b = colorsys.hsv_to_rgb((hue % 360) / 360, sat, val)
        return int(r * 255), int(g * 255), int(b * 255)

    @staticmethod
    def _polygon(name: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
        def ring(n: int, radius: float, offset: float = 0.0) -> list[tuple[float, float]]:
            return [(cx + radius * math.cos(rot + offset + 2 * math.pi * k / n),
                     cy + radius * math.sin(rot + offset + 2 * math.pi * k / n)) for k in range(n)]

        if name == "square":
            return ring(4, r * 1.1, math.pi / 4)
        if name == "triangle":
            return ring(3, r * 1.2, -math.pi / 2)
        if name == "hexagon":
            return ring(6, r)
        if name == "diamond":
            pts = ring(4, r)
            return [(cx + (x - cx) * 0.7, y) for x, y in pts]
        if name == "star":
            outer, inner = ring(5, r * 1.15, -math.pi / 2), ring(5, r * 0.5, -math.pi / 2 + math.pi / 5)
            return [p for pair in zip(outer, inner) for p in pair]
        if name == "cross":
            a, b = r, r * 0.38
            pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
            c, s = math.cos(rot), math.sin(rot)
            return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
        if name == "heart":
            pts = []
            for k in range(40):
                t = 2 * math.pi * k / 40
                x = 16 * math.sin(t) ** 3
                y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
                pts.append((cx + x * r / 16, cy + y * r / 16))
            return pts
        return None  # circle

    def _draw(self, draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
        poly = self._polygon(name, cx, cy, r, rot)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(poly, fill=fill)

    def sample(self, split: str, index: int) -> "ShapeSample":
        """One image, its exact mask (0 = background, c+1 = class c) and its shapes' class names in drawing order."""
        rng = self._rng(split, index)
        s = self.image_size
        for _ in range(100):  # resample layouts where a shape would be mostly hidden (bounded)
            n = int(rng.integers(self.min_objects, self.max_objects + 1))
            objects = []
            for _ in range(n):
                name = self.classes[int(rng.integers(len(self.classes)))]
                r = rng.uniform(self.min_radius, self.max_radius) * s
                cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
                objects.append((name, cx, cy, r, rng.uniform(0, 2 * math.pi), self._colour(rng, name)))
            ids = Image.new("L", (s, s), 0)  # which object (1-based) owns each pixel
            draw_ids = ImageDraw.Draw(ids)
            areas = []
            for k, (name, cx, cy, r, rot, _) in enumerate(objects):
                alone = Image.new("L", (s, s), 0)
                self._draw(ImageDraw.Draw(alone), name, cx, cy, r, rot, 1)
                areas.append(int(np.asarray(alone).sum()))
                self._draw(draw_ids, name, cx, cy, r, rot, k + 1)
            owner = np.asarray(ids)
            if all(areas[k] > 0 and (owner == k + 1).sum() >= MIN_VISIBLE * areas[k] for k in range(n)):
                break
        else:  # pragma: no cover - 100 failed layouts would be a bug in the parameters
            raise RuntimeError("could not place the shapes without hiding one")
        background = self._background(rng)
        image = Image.fromarray(background)
        draw = ImageDraw.Draw(image)
        for name, cx, cy, r, rot, colour in objects:
            self._draw(draw, name, cx, cy, r, rot, colour)
        mask = np.zeros((s, s), np.uint8)
        for k, (name, *_rest) in enumerate(objects):
            mask[owner == k + 1] = self.classes.index(name) + 1
        return ShapeSample(image, mask, [o[0] for o in objects], background)

    def caption(self, split: str, index: int, names: list[str]) -> str:
        rng = np.random.default_rng([self.seed, 2, SPLITS[split], index])
        counts: dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        words = {1: "a", 2: "two", 3: "three"}
        parts = [f"{words.get(c, str(c))} {name}{'s' if c > 1 else ''}" for name, c in counts.items()]
        order = rng.permutation(len(parts))
        parts = [parts[i] for i in order]
        one, many = (TEMPLATES_ONE_BG, TEMPLATES_MANY_BG) if self.caption_background else (TEMPLATES_ONE, TEMPLATES_MANY)
        if len(parts) == 1 and counts[names[0]] == 1:
            return one[int(rng.integers(len(one)))].format(names[0])
        phrase = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return many[int(rng.integers(len(many)))].format(phrase)

    @property
    def nouns(self) -> list[str]:
        """The nouns its captions name: the classes (and the background, when captions name it)."""
        return [*self.classes, *([BACKGROUND_NOUN] if self.caption_background else [])]




def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_train_images(world: ShapesWorld, out_dir: str | Path, count: int) -> list[dict[str, str]]:
    """Write ``count`` training images as JPEG files; returns rows {path, caption} (path relative to out_dir)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm(range(count), desc="shapes world: training images", disable=count < 1000, unit="img"):
        sample = world.sample("train", i)
        rel = f"images/{i:08d}.jpg"
        atomic_write_bytes(out / rel, _encode(sample.image, "JPEG", quality=95))
        rows.append({"path": rel, "caption": world.caption("train", i, sample.names)})
    return rows


def write_voc_val(world: ShapesWorld, out_dir: str | Path, count: int, split: str = "val") -> Path:
    """Write a VOC-format evaluation set of ``split``'s images (val or dev; listed in val.txt); returns its root."""
    root = Path(out_dir)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(count):
        sample = world.sample(split, i)
        name = f"shapes_{split}_{i:06d}"
        atomic_write_bytes(root / "JPEGImages" / f"{name}.jpg", _encode(sample.image, "JPEG", quality=95))
        palette = Image.fromarray(sample.mask, mode="P")
        palette.putpalette(VOC_PALETTE)
        atomic_write_bytes(root / "SegmentationClass" / f"{name}.png", _encode(palette, "PNG"))
        ids.append(name)
    atomic_write_bytes(root / "ImageSets/Segmentation/val.txt", ("\n".join(ids) + "\n").encode())
    atomic_write_bytes(root / "class_names.txt", ("\n".join(("background", *world.classes)) + "\n").encode())
    return root


def write_url_list(rows: list[dict[str, str]], base_url: str, out_dir: str | Path) -> Path:
    """The url list of generated training images served at ``base_url`` (http://… or file://…), in the format
    the sources stage writes: parquet with url, caption, source, key."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base_url.rstrip("/")
    urls = [f"{base}/{r['path']}" for r in rows]
    frame = pd.DataFrame({"url": urls, "caption": [r["caption"] for r in rows], "source": "shapes",
                          "key": [url_key(u) for u in urls]})
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(out / "part-00000.parquet", buf.getvalue())
    return out


def download_world(www: str | Path, rows: list[dict[str, str]], urls: str | Path, shards: str | Path, spec: Any,
                   serve: str = "http") -> dict[str, Any]:
    """Download the written training images into webdataset shards with the download stage: served over HTTP on
    127.0.0.1 (``serve="http"``, the way real url lists are fetched) or read through file:// URLs."""
    if serve not in ("http", "file"):
        raise ValueError(f"serve must be 'http' or 'file', got {serve!r}")
    if serve == "file":
        write_url_list(rows, Path(www).resolve().as_uri(), urls)
        return download(urls, shards, spec)
    with serve_directory(www) as base:
        write_url_list(rows, base, urls)
        return download(urls, shards, spec)
