"""Zero-shot evaluation in one process: samples through the protocol (SPEC §6) into confusion counts, a small
dataset scored in process (evaluation during training), and the result of an evaluation (its table, figures and
overlays). The Ray Data evaluation of ``pipelines.evaluate`` runs :func:`score_samples` in its actors."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .datasets import SegmentationDataset, read_mask
from .fileio import atomic_write_bytes, atomic_write_json
from .metrics import ConfusionMatrix, SegmentationScores
from .segment import ProtocolSettings, Segmenter, protocol_input, read_image


def dataset_segmenter(model: Any, class_names: list[str], settings: ProtocolSettings, batch: int = 8) -> Segmenter:
    """The protocol for a dataset's classes: with a background threshold, label 0 is background (no prompt);
    ``batch``: windows per forward pass."""
    names = class_names[1:] if settings.bg_thresh is not None else class_names  # prompts: foreground classes only
    return Segmenter(model, names, settings, batch=batch)


Scored = tuple[np.ndarray, np.ndarray, np.ndarray, Any, np.ndarray]  # codes, counts, labels, image, ground truth


def score_samples(segmenter: Segmenter, samples: Sequence[tuple[str, str]], num_classes: int, reader: str,
                  true_labels: bool) -> list[Scored | ValueError | OSError]:
    """Several (image path, mask path) through the protocol together (their windows batched): per sample, (confusion
    codes, their counts, predicted labels, the image, the ground truth), or the error that its files gave. Codes are
    ``target * num_classes + prediction`` over the pixels that are not 255."""
    bg = segmenter.settings.bg_thresh is not None
    read: list[tuple[Any, np.ndarray] | ValueError | OSError] = []
    for image_path, mask_path in samples:
        try:
            image = read_image(image_path)
            target = read_mask(mask_path, num_classes, reader)
            if target.shape != (image.height, image.width):
                raise ValueError(f"{mask_path}: mask {target.shape} and image {(image.height, image.width)} differ")
        except (ValueError, OSError) as exc:
            read.append(exc)
        else:
            read.append((image, target))
    good = [r for r in read if isinstance(r, tuple)]
    inputs = []
    for image, target in good:
        candidates = None
        if true_labels:  # True Label Guidance: only the classes of the ground truth compete
            present = np.unique(target[(target != 255) & (target > (0 if bg else -1))])
            candidates = [int(c) - (1 if bg else 0) for c in present] or None
        arr = np.asarray(image)
        inputs.append((protocol_input(arr, segmenter.settings), tuple(arr.shape[:2]), candidates))
    results = iter(segmenter.segment_many(inputs) if inputs else [])
    out: list[Scored | ValueError | OSError] = []
    for r in read:
        if not isinstance(r, tuple):
            out.append(r)
            continue
        image, target = r
        labels = next(results).labels.numpy()
        valid = target != 255
        codes, counts = np.unique(target[valid].astype(np.int64) * num_classes + labels[valid], return_counts=True)
        out.append((codes, counts, labels, image, target))
    return out


def score_sample(segmenter: Segmenter, image_path: str, mask_path: str, num_classes: int, reader: str,
                 true_labels: bool) -> Scored:
    """One sample's :func:`score_samples`; its files' error raised."""
    (result,) = score_samples(segmenter, [(image_path, mask_path)], num_classes, reader, true_labels)
    if isinstance(result, Exception):
        raise result
    return result


def all_background_miou(matrix: ConfusionMatrix, settings: ProtocolSettings) -> float:
    """The baseline beside a model's mIoU: label 0 everywhere (nan without a background class)."""
    return matrix.constant_prediction(0).scores().miou if settings.bg_thresh is not None else float("nan")


def confusion_in_process(model: Any, dataset: SegmentationDataset, settings: ProtocolSettings,
                         true_labels: bool = False, part: tuple[int, int] = (0, 1),
                         images_per_batch: int = 4) -> ConfusionMatrix:
    """The confusion counts of samples ``part[0]``, ``part[0] + part[1]``, … of ``dataset`` (one rank's share of a
    set scored by several: their sum is the whole set's), in this process, ``images_per_batch`` images' windows
    through the model together."""
    protocol = dataset_segmenter(model, dataset.class_names, settings)
    matrix = ConfusionMatrix(len(dataset.class_names), class_names=dataset.class_names)
    flat = matrix.matrix.view(-1)
    mine = [(str(s.image), str(s.mask)) for s in dataset.samples[part[0]::part[1]]]
    for start in range(0, len(mine), images_per_batch):
        for result in score_samples(protocol, mine[start:start + images_per_batch], len(dataset.class_names),
                                    dataset.reader, true_labels):
            if isinstance(result, Exception):
                raise result
            codes, counts, *_ = result
            flat.index_add_(0, torch.as_tensor(codes), torch.as_tensor(counts))
    return matrix


def evaluate_in_process(model: Any, dataset: SegmentationDataset, settings: ProtocolSettings,
                        true_labels: bool = False) -> tuple[SegmentationScores, float]:
    """The same figures without Ray, in this process: (scores, all-background mIoU)."""
    matrix = confusion_in_process(model, dataset, settings, true_labels)
    return matrix.scores(), all_background_miou(matrix, settings)


@dataclass
class EvalResult:
    dataset: str
    scores: SegmentationScores
    settings: ProtocolSettings
    images: int
    overlays: list[bytes] = field(default_factory=list)  # image | ground truth | prediction, PNG
    baseline_miou: float = float("nan")  # predicting background (label 0) everywhere, on the same pixels
    overlay_ids: list[str] = field(default_factory=list)  # the samples drawn in ``overlays``
    background_only: bool = False  # the model predicted background on every pixel

    def hint(self) -> str | None:
        """What to tell a user whose model predicts nothing but background."""
        if not self.background_only:
            return None
        return (f"{self.dataset}: every pixel was predicted background: the model may be untrained (random weights) "
                f"or the threshold ({self.settings.bg_thresh}) too high for it; try a lower --bg-thresh")

    def figures(self) -> dict[str, Any]:
        return {"miou": self.scores.miou, "macc": self.scores.macc, "aacc": self.scores.aacc, "images": self.images,
                "all_background_miou": self.baseline_miou, "table": self.scores.table(),
                "settings": asdict(self.settings)}

    def write(self, folder: str | Path) -> Path:
        """The table (Markdown), the figures (JSON) and the overlays (PNG) into ``folder/<dataset>…``."""
        table, figures, pictures = result_paths(folder, self.dataset)
        atomic_write_bytes(table, (self.table_text() + "\n").encode())
        atomic_write_json(figures, self.figures())
        for sid, picture in zip(self.overlay_ids, self.overlays):
            atomic_write_bytes(pictures / f"{str(sid).replace('/', '_')}.png", picture)
        return Path(folder)

    def table_text(self) -> str:
        lines = [f"{self.dataset}: mIoU {100 * self.scores.miou:.2f}  mAcc {100 * self.scores.macc:.2f}  "
                 f"aAcc {100 * self.scores.aacc:.2f}  ({self.images} images; all-background mIoU "
                 f"{100 * self.baseline_miou:.2f})",
                 f"{'class':24}{'IoU':>8}{'Acc':>8}"]
        for row in self.scores.table():
            lines.append(f"{str(row['class'])[:24]:24}{100 * row['iou']:8.2f}{100 * row['accuracy']:8.2f}")
        return "\n".join(lines)


def result_paths(folder: str | Path, dataset: str) -> tuple[Path, Path, Path]:
    """Where :meth:`EvalResult.write` puts a dataset's table, figures and overlay folder."""
    folder = Path(folder)
    return folder / f"{dataset}.md", folder / f"{dataset}.json", folder / dataset


@dataclass
class ClassificationResult:
    dataset: str
    top1: float
    top5: float
    images: int
    classes: int

    def table_text(self) -> str:
        return (f"{self.dataset}: zero-shot top-1 {100 * self.top1:.2f}  top-5 {100 * self.top5:.2f}  "
                f"({self.images} images, {self.classes} classes)")
