"""Grouping quality apart from naming: the oracle-labelled group mIoU. Every final group of every window takes the
ground-truth class (background included) that covers most of its pixels; the windows' one-hot votes are averaged
as the protocol averages its scores (SPEC §6), and the result is scored like a prediction. A grouping that follows
the masks exactly scores 100 whatever the text side has learned; naming errors do not lower it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..datasets import SegmentationDataset
from ..metrics import ConfusionMatrix
from ..segment import ProtocolSettings, group_weights, protocol_input, read_image, upscale_labels, window_boxes


def group_classes(groups: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``groups`` [h, w] group ids and ``target`` [h, w] class ids of one window → (each group's majority class
    [G] (ties: the lower class id; a group with no labelled pixel: ``ignore_index``), each group's labelled pixels
    [G]), for the groups 0 … max id."""
    if groups.shape != target.shape:
        raise ValueError(f"group map {tuple(groups.shape)} and target {tuple(target.shape)} differ")
    g, t = groups.reshape(-1).long(), target.reshape(-1).long()
    keep = t != ignore_index
    n_groups = int(g.max()) + 1
    counts = torch.bincount(g[keep] * num_classes + t[keep], minlength=n_groups * num_classes)
    counts = counts.reshape(n_groups, num_classes)
    best = counts.argmax(dim=1)  # argmax returns the first maximum: the lower class id
    pixels = counts.sum(dim=1)
    best[pixels == 0] = ignore_index
    return best, pixels


def oracle_labels(groups: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
                  ) -> torch.Tensor:
    """[h, w]: each pixel the majority class of its group (:func:`group_classes`)."""
    best, _ = group_classes(groups, target, num_classes, ignore_index)
    return best[groups.long()].reshape(groups.shape)


def _nearest(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    return upscale_labels(torch.from_numpy(mask.astype(np.int64)), size).long()


@dataclass
class WindowGroups:
    """One window's final groups as the protocol sees them, named by the ground truth."""

    box: tuple[int, int, int, int]  # (y0, x0, y1, x1) at protocol size
    groups: torch.Tensor  # [h, w] each pixel's group (the argmax of the soft assignment)
    classes: torch.Tensor  # [G] each group's majority class (255: no labelled pixel)
    pixels: torch.Tensor  # [G] each group's labelled pixels
    embeddings: torch.Tensor | None  # [G, D] the projected group tokens (the segmentation embedding)


@torch.no_grad()
def image_windows(model: Any, image: np.ndarray, target: np.ndarray, num_classes: int,
                  settings: ProtocolSettings, ignore_index: int = 255) -> tuple[tuple[int, int], list[WindowGroups]]:
    """One image (8-bit RGB [H, W, 3]) and its mask [H, W] → (the protocol size, its windows' groups)."""
    x = protocol_input(image, settings)
    _, height, width = x.shape
    small = _nearest(target, (height, width))  # the mask at protocol size: what each window's groups are named by
    out = []
    for y0, x0, y1, x1 in window_boxes(height, width, settings):
        emb = model.encode_image(x[None, :, y0:y1, x0:x1])
        weights = group_weights(emb, (y1 - y0, x1 - x0))[0]
        groups = weights.max(dim=0).indices
        classes, pixels = group_classes(groups, small[y0:y1, x0:x1], num_classes, ignore_index)
        pad = weights.shape[0] - classes.shape[0]  # groups above the largest id used: no pixel
        classes = torch.cat([classes, classes.new_full((pad,), ignore_index)])
        pixels = torch.cat([pixels, pixels.new_zeros(pad)])
        embedded = getattr(emb, "groups", None)
        out.append(WindowGroups((y0, x0, y1, x1), groups, classes, pixels,
                                None if embedded is None else embedded[0].float()))
    return (height, width), out


def oracle_prediction(model: Any, image: np.ndarray, target: np.ndarray, num_classes: int,
                      settings: ProtocolSettings, ignore_index: int = 255,
                      windows: tuple[tuple[int, int], list[WindowGroups]] | None = None) -> torch.Tensor:
    """One image and its mask → the oracle labels [H, W] (see the module's doc); ``windows``: the image's
    :func:`image_windows` when they are at hand."""
    (height, width), found = windows or image_windows(model, image, target, num_classes, settings, ignore_index)
    votes = torch.zeros(num_classes, height, width)
    count = torch.zeros(1, height, width)
    for w in found:
        y0, x0, y1, x1 = w.box
        labels = w.classes[w.groups]
        known = labels != ignore_index
        window = torch.zeros(num_classes, y1 - y0, x1 - x0)
        window.scatter_(0, labels.clamp(max=num_classes - 1)[None], known[None].float())
        votes[:, y0:y1, x0:x1] += window
        count[:, y0:y1, x0:x1] += 1
    averaged = votes / count
    labels = averaged.argmax(dim=0)
    labels[averaged.sum(dim=0) == 0] = ignore_index  # no window could name the pixel
    return upscale_labels(labels, tuple(target.shape)).long()


def score_oracle(matrix: ConfusionMatrix, pred: torch.Tensor, target: np.ndarray, source: str) -> None:
    """Add one image's oracle labels to ``matrix``: a pixel no group could name counts as a miss."""
    truth = torch.from_numpy(target.astype(np.int64))
    miss = (truth != 255) & (pred == 255)
    if miss.any():  # scored as the class after its own (never a hit)
        pred = torch.where(miss, (truth + 1) % matrix.num_classes, pred)
    matrix.update(pred, truth, source)


def oracle_confusion(model: Any, dataset: SegmentationDataset, settings: ProtocolSettings,
                     part: tuple[int, int] = (0, 1)) -> ConfusionMatrix:
    """The confusion counts of the oracle-labelled groups over samples ``part[0]``, ``part[0] + part[1]``, … of
    ``dataset`` (one rank's share; the sum over the parts is the whole set's)."""
    model.eval()
    n = len(dataset.class_names)
    matrix = ConfusionMatrix(n, class_names=dataset.class_names)
    for sample in dataset.samples[part[0]::part[1]]:
        image, target = np.asarray(read_image(sample.image)), dataset.read_mask(sample)
        score_oracle(matrix, oracle_prediction(model, image, target, n, settings), target, str(sample.mask))
    return matrix


__all__ = ["WindowGroups", "group_classes", "image_windows", "oracle_confusion", "oracle_labels",
           "oracle_prediction", "score_oracle"]
