"""Segmentation datasets in their published on-disk layouts (SPEC §6), plus any folder of images and masks.

Each reader yields :class:`Sample` (id, image path, mask path) and knows its class names (index = label id,
``background`` first) and its default background threshold. Masks are read as label-id arrays; ids outside the
class list (other than 255 = ignore) are an error naming the file and the ids.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .fileio import atomic_write_bytes
from .limits import IMAGE_SUFFIXES

IGNORE = 255

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "table", "dog", "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor")
CONTEXT_CLASSES = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood")
COCO_THING_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                  32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                  58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                  88, 89, 90)
COCO_OBJECT_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")


@dataclass
class Sample:
    id: str
    image: Path
    mask: Path


@dataclass
class SegmentationDataset:
    """A list of samples, the class names (index = id) and the default background threshold."""

    name: str
    root: Path
    samples: list[Sample]
    class_names: list[str]
    bg_thresh: float | None
    reader: str = "palette"  # how masks are stored: "palette"/"ids" (8-bit ids), "rgb_ids" (ImageNet-S: R + 256·G)
    candidates: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def read_mask(self, sample: Sample) -> np.ndarray:
        return read_mask(sample.mask, len(self.class_names), self.reader)


def read_mask(path: Path, num_classes: int, reader: str = "palette") -> np.ndarray:
    """A mask file → [H, W] int64 label ids; ids outside 0..num_classes-1 other than 255 raise ValueError."""
    try:
        with Image.open(path) as im:
            if reader == "rgb_ids":  # ImageNet-S: id = R + 256·G, 1000 = ignore
                rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
                ids = rgb[..., 0] + 256 * rgb[..., 1]
                ids[ids == 1000] = IGNORE
            else:
                if im.mode not in ("P", "L", "I", "I;16"):
                    raise ValueError(f"{path}: a mask must be a palette or grey-level image of ids, got mode {im.mode}")
                ids = np.asarray(im, dtype=np.int64)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable mask ({exc})") from None
    bad = np.unique(ids[(ids != IGNORE) & ((ids < 0) | (ids >= num_classes))])
    if bad.size:
        raise ValueError(f"{path}: label ids {bad.tolist()[:20]} are outside the {num_classes} classes "
                         f"(0..{num_classes - 1}, {IGNORE} = ignore)")
    return ids


def _split_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split list not found")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _paired(root: Path, ids: list[str], image_dir: str, mask_dir: str, image_ext: str, mask_ext: str) -> list[Sample]:
    samples, missing = [], []
    for i in ids:
        image, mask = root / image_dir / f"{i}{image_ext}", root / mask_dir / f"{i}{mask_ext}"
        if not image.is_file() or not mask.is_file():
            missing.append(str(image if not image.is_file() else mask))
        samples.append(Sample(i, image, mask))
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} listed files are missing, e.g. {missing[:3]}")
    return samples


def voc(root: str | Path, split: str = "val") -> SegmentationDataset:
    """PASCAL VOC 2012: JPEGImages/, SegmentationClass/ (palette PNGs), ImageSets/Segmentation/{split}.txt. A
    ``class_names.txt`` beside them (one name per line, label 0 first) replaces VOC's 21 names (e.g. the shapes
    world's validation set)."""
    root = Path(root)
    ids = _split_ids(root / "ImageSets" / "Segmentation" / f"{split}.txt")
    names_file = root / "class_names.txt"
    names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()] if names_file.is_file() \
        else list(VOC_CLASSES)
    return SegmentationDataset("voc" if not names_file.is_file() else root.name, root,
                               _paired(root, ids, "JPEGImages", "SegmentationClass", ".jpg", ".png"), names, 0.95)


def context(root: str | Path, split: str = "val") -> SegmentationDataset:
    """PASCAL Context (59 classes + background, mmseg layout): JPEGImages/, SegmentationClassContext/,
    ImageSets/SegmentationContext/{split}.txt."""
    root = Path(root)
    ids = _split_ids(root / "ImageSets" / "SegmentationContext" / f"{split}.txt")
    return SegmentationDataset("context", root, _paired(root, ids, "JPEGImages", "SegmentationClassContext", ".jpg",
                                                        ".png"), list(CONTEXT_CLASSES), 0.36)


def coco_object(root: str | Path, split: str = "val2017") -> SegmentationDataset:
    """COCO-Object: images/{split}/*.jpg and annotations/{split}/*_instanceTrainIds.png (made from COCO-Stuff by
    :func:`convert_coco_stuff`)."""
    root = Path(root)
    masks = sorted((root / "annotations" / split).glob("*_instanceTrainIds.png"))
    if not masks:
        raise FileNotFoundError(f"{root / 'annotations' / split}: no *_instanceTrainIds.png (run the COCO-Stuff "
                                f"conversion first: pgseg.datasets.convert_coco_stuff)")
    ids = [m.name[: -len("_instanceTrainIds.png")] for m in masks]
    return SegmentationDataset("coco_object", root, _paired(root, ids, f"images/{split}", f"annotations/{split}", ".jpg",
                                                            "_instanceTrainIds.png"), list(COCO_OBJECT_CLASSES), 0.85)


def coco_stuff_to_object(stuff: np.ndarray) -> np.ndarray:
    """A COCO-Stuff label map (value = COCO category id − 1; things 0..89, stuff 91..181, 255 unlabelled) → the
    COCO-Object map: the 80 things as 1..80 in COCO's order, all stuff and unlabelled → 0 (background)."""
    lut = np.zeros(256, np.uint8)
    for k, cid in enumerate(COCO_THING_IDS):
        lut[cid - 1] = k + 1
    return lut[stuff.astype(np.uint8)]


def convert_coco_stuff(stuff_dir: str | Path, out_dir: str | Path) -> int:
    """Write ``{id}_instanceTrainIds.png`` for every COCO-Stuff ``{id}.png`` of ``stuff_dir``; returns the count."""
    stuff_dir, out_dir = Path(stuff_dir), Path(out_dir)
    files = sorted(stuff_dir.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"{stuff_dir}: no COCO-Stuff label PNGs")
    for path in files:
        with Image.open(path) as im:
            converted = coco_stuff_to_object(np.asarray(im))
        buf = io.BytesIO()
        Image.fromarray(converted, "L").save(buf, format="PNG")
        atomic_write_bytes(out_dir / f"{path.stem}_instanceTrainIds.png", buf.getvalue())
    return len(files)


def imagenet_s(root: str | Path, split: str = "validation", subset: str = "919") -> SegmentationDataset:
    """ImageNet-S{subset}: {split}/{wnid}/*.JPEG, {split}-segmentation/{wnid}/*.png (id = R + 256·G), class names
    from ImageNetS_categories_im{subset}.txt (one per line, wnid and name) beside them."""
    root = Path(root)
    names_file = root / f"ImageNetS_categories_im{subset}.txt"
    if not names_file.is_file():
        raise FileNotFoundError(f"{names_file}: the category list of ImageNet-S{subset} is needed for class names")
    names = ["background"] + [line.split(maxsplit=1)[-1].strip() for line in names_file.read_text().splitlines()
                              if line.strip()]
    samples = []
    for mask in sorted((root / f"{split}-segmentation").glob("*/*.png")):
        stem = f"{mask.parent.name}/{mask.stem}"
        image = next((root / split / f"{stem}{ext}" for ext in (".JPEG", ".jpg", ".jpeg", ".png")
                      if (root / split / f"{stem}{ext}").is_file()), None)
        if image is None:
            raise FileNotFoundError(f"{root / split / stem}.JPEG: the image of {mask} is missing")
        samples.append(Sample(stem, image, mask))
    if not samples:
        raise FileNotFoundError(f"{root / (split + '-segmentation')}: no masks")
    return SegmentationDataset(f"imagenet_s{subset}", root, samples, names, 0.11, reader="rgb_ids")


def lvis(root: str | Path, split: str = "val") -> SegmentationDataset:
    """LVIS as semantic masks: images/{split}/*.jpg, masks/{split}/*.png (16-bit ids: category id, 0 = background)
    and the class names from annotations/lvis_v1_{split}.json's categories (1203 + background)."""
    root = Path(root)
    ann = root / "annotations" / f"lvis_v1_{split}.json"
    if not ann.is_file():
        raise FileNotFoundError(f"{ann}: the LVIS annotation file is needed for class names")
    categories = sorted(json.loads(ann.read_text())["categories"], key=lambda c: c["id"])
    names = ["background"] + [c["name"].replace("_", " ") for c in categories]
    masks = sorted((root / "masks" / split).glob("*.png"))
    ids = [m.stem for m in masks]
    return SegmentationDataset("lvis", root, _paired(root, ids, f"images/{split}", f"masks/{split}", ".jpg", ".png"),
                               names, 0.35, reader="ids")


def folder(root: str | Path, images: str = "images", masks: str = "masks",
           classes_file: str = "classes.txt", bg_thresh: float | None = None) -> SegmentationDataset:
    """Any folder: images/<id>.<ext>, masks/<id>.png (ids), classes.txt (one name per line; the first line names
    label 0, e.g. ``background``). With a background line, ``bg_thresh`` defaults to 0.95."""
    root = Path(root)
    names_path = root / classes_file
    if not names_path.is_file():
        raise FileNotFoundError(f"{names_path}: a class-names file (one name per line, line 1 = label 0) is needed")
    names = [n.strip() for n in names_path.read_text().splitlines() if n.strip()]
    if not names:
        raise ValueError(f"{names_path}: no class names")
    samples = []
    for image in sorted(p for p in (root / images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = root / masks / f"{image.stem}.png"
        if not mask.is_file():
            raise FileNotFoundError(f"{mask}: the mask of {image.name} is missing")
        samples.append(Sample(image.stem, image, mask))
    if not samples:
        raise FileNotFoundError(f"{root / images}: no images")
    has_bg = names[0].lower() == "background"
    return SegmentationDataset(root.name, root, samples, names,
                               bg_thresh if bg_thresh is not None else (0.95 if has_bg else None), reader="ids")


READERS = {"voc": voc, "context": context, "coco_object": coco_object, "imagenet_s": imagenet_s, "lvis": lvis,
           "folder": folder}


def open_dataset(spec: str) -> SegmentationDataset:
    """``KIND:ROOT`` (voc, context, coco_object, imagenet_s, lvis, folder) → the dataset."""
    kind, sep, root = spec.partition(":")
    if not sep or kind not in READERS:
        raise ValueError(f"dataset {spec!r}: expected KIND:ROOT with KIND one of {sorted(READERS)}")
    return READERS[kind](root)
