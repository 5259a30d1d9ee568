"""Grouping quality apart from naming: the oracle-labelled group mIoU. Every final group of every window takes the
ground-truth class (background included) that covers most of its pixels; the windows' one-hot votes are averaged
as the protocol averages its scores (SPEC §6), and the result is scored like a prediction. A grouping that follows
the masks exactly scores 100 whatever the text side has learned; naming errors do not lower it."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..datasets import SegmentationDataset
from ..metrics import ConfusionMatrix
from ..segment import ProtocolSettings, group_weights, protocol_input, read_image, upscale_labels, window_boxes


def oracle_labels(groups: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
                  ) -> torch.Tensor:
    """``groups`` [h, w] group ids and ``target`` [h, w] class ids of one window → [h, w]: each pixel the class
    most frequent among the target pixels of its group (ties: the lower class id; a group with no labelled pixel:
    ``ignore_index``)."""
    if groups.shape != target.shape:
        raise ValueError(f"group map {tuple(groups.shape)} and target {tuple(target.shape)} differ")
    g, t = groups.reshape(-1).long(), target.reshape(-1).long()
    keep = t != ignore_index
    n_groups = int(g.max()) + 1
    counts = torch.bincount(g[keep] * num_classes + t[keep], minlength=n_groups * num_classes)
    counts = counts.reshape(n_groups, num_classes)
    best = counts.argmax(dim=1)  # argmax returns the first maximum: the lower class id
    best[counts.sum(dim=1) == 0] = ignore_index
    return best[g].reshape(groups.shape)


def _nearest(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    return upscale_labels(torch.from_numpy(mask.astype(np.int64)), size).long()


@torch.no_grad()
def oracle_prediction(model: Any, image: np.ndarray, target: np.ndarray, num_classes: int,
                      settings: ProtocolSettings, ignore_index: int = 255) -> torch.Tensor:
    """One image (8-bit RGB [H, W, 3]) and its mask [H, W] → the oracle labels [H, W] (see the module's doc)."""
    x = protocol_input(image, settings)
    _, height, width = x.shape
    small = _nearest(target, (height, width))  # the mask at protocol size: what each window's groups are named by
    votes = torch.zeros(num_classes, height, width)
    count = torch.zeros(1, height, width)
    for y0, x0, y1, x1 in window_boxes(height, width, settings):
        emb = model.encode_image(x[None, :, y0:y1, x0:x1])
        groups = group_weights(emb, (y1 - y0, x1 - x0))[0].max(dim=0).indices
        labels = oracle_labels(groups, small[y0:y1, x0:x1], num_classes, ignore_index)
        known = labels != ignore_index
        window = torch.zeros(num_classes, y1 - y0, x1 - x0)
        window.scatter_(0, labels.clamp(max=num_classes - 1)[None], known[None].float())
        votes[:, y0:y1, x0:x1] += window
        count[:, y0:y1, x0:x1] += 1
    averaged = votes / count
    labels = averaged.argmax(dim=0)
    labels[averaged.sum(dim=0) == 0] = ignore_index  # no window could name the pixel
    return upscale_labels(labels, tuple(target.shape)).long()


def oracle_confusion(model: Any, dataset: SegmentationDataset, settings: ProtocolSettings) -> ConfusionMatrix:
    """The confusion counts of the oracle-labelled groups over ``dataset`` (a pixel no group could name counts as
    a miss: it is predicted as the ignore label and scored against its class)."""
    model.eval()
    n = len(dataset.class_names)
    matrix = ConfusionMatrix(n, class_names=dataset.class_names)
    for sample in dataset.samples:
        image = np.asarray(read_image(sample.image))
        target = dataset.read_mask(sample)
        pred = oracle_prediction(model, image, target, n, settings)
        valid = torch.from_numpy(target.astype(np.int64)) != 255
        miss = valid & (pred == 255)
        if miss.any():  # an unnamed pixel is wrong: scored as the class after its own (never a hit)
            pred = torch.where(miss, (torch.from_numpy(target.astype(np.int64)) + 1) % n, pred)
        matrix.update(pred, torch.from_numpy(target.astype(np.int64)), str(sample.mask))
    return matrix


__all__ = ["oracle_confusion", "oracle_labels", "oracle_prediction"]
