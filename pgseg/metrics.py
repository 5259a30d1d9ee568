"""Segmentation metrics (SPEC §6 step 6): a confusion matrix accumulated over the dataset with an ignore index; IoU
and accuracy per class (background counts as a class), mIoU = the mean over classes that occur (nanmean).

Accumulating the confusion matrix is the same as accumulating per-image intersections and unions: both sum the
same per-pixel counts, so the figures equal the mmseg protocol's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SegmentationScores:
    iou: list[float]  # per class (nan where the class never occurs in ground truth or prediction)
    accuracy: list[float]  # per class: correct pixels / ground-truth pixels (nan when absent)
    miou: float
    macc: float
    aacc: float  # all pixels
    class_names: list[str] = field(default_factory=list)

    def table(self) -> list[dict[str, float | str]]:
        names = self.class_names or [str(i) for i in range(len(self.iou))]
        return [{"class": n, "iou": i, "accuracy": a} for n, i, a in zip(names, self.iou, self.accuracy)]


class ConfusionMatrix:
    """``update(pred, target)`` with label maps of the same shape; ``scores()`` at the end."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, class_names or []
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [target, pred]

    def update(self, pred: torch.Tensor, target: torch.Tensor, source: str = "mask") -> None:
        if pred.shape != target.shape:
            raise ValueError(f"{source}: prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ")
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        bad = target[(target < 0) | (target >= self.num_classes)].unique()
        if bad.numel():
            raise ValueError(f"{source}: ground-truth ids {bad.tolist()} are outside the {self.num_classes} classes "
                             f"(0..{self.num_classes - 1}, {self.ignore_index} = ignore)")
        if ((pred < 0) | (pred >= self.num_classes)).any():
            raise ValueError(f"{source}: predicted ids outside 0..{self.num_classes - 1}")
        n = self.num_classes
        self.matrix += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def constant_prediction(self, label: int = 0) -> "ConfusionMatrix":
        """The matrix a model predicting ``label`` everywhere would give on the same pixels (e.g. the all-background
        baseline beside a model's mIoU)."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} is outside 0..{self.num_classes - 1}")
        out = ConfusionMatrix(self.num_classes, self.ignore_index, self.class_names or None)
        out.matrix[:, label] = self.matrix.sum(dim=1)
        return out

    def scores(self) -> SegmentationScores:
        m = self.matrix.double()
        tp = m.diag()
        gt, predicted = m.sum(dim=1), m.sum(dim=0)
        union = gt + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return SegmentationScores(iou.tolist(), acc.tolist(), float(iou.nanmean()), float(acc.nanmean()),
                                  float(tp.sum() / total) if total > 0 else float("nan"), list(self.class_names))
