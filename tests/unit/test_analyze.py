"""The oracle-labelled group mIoU on hand-made groupings: a grouping that follows the masks scores 100 whatever the
groups are called; one group for the whole image scores only what its majority class gives."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pgseg.analyze import oracle_confusion, oracle_labels
from pgseg.datasets import voc
from pgseg.segment import ProtocolSettings
from pgseg.visualize import PALETTE

LEVELS = (30, 110, 190, 250)  # the red value that draws class 0, 1, 2, 3


class RegionModel:
    """A stand-in image encoder whose groups are given, not learned: ``groups(red)`` maps each pixel's red value
    (which draws its class) to a group id; ``encode_image`` returns the one-stage soft assignment the protocol
    reads (one-hot, at the window's own resolution)."""

    def __init__(self, groups, n_groups: int = 8):
        self.groups, self.n_groups = groups, n_groups

    def eval(self):
        return self

    def encode_image(self, crop: torch.Tensor):
        red = crop[0, 0] * 0.229 + 0.485  # undo the normalisation of the red channel: [0, 1]
        cls = torch.as_tensor(np.abs(red.numpy()[..., None] * 255 - np.array(LEVELS)).argmin(-1))
        group = self.groups(cls)
        soft = torch.nn.functional.one_hot(group.flatten(), self.n_groups).T[None].float()  # [1, G, N]
        stage = SimpleNamespace(assignment=SimpleNamespace(soft=soft))
        return SimpleNamespace(out=SimpleNamespace(stages=[stage], grid=tuple(crop.shape[-2:])))


def _dataset(root: Path, masks: list[np.ndarray]):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = []
    for i, mask in enumerate(masks):
        rgb = np.zeros((*mask.shape, 3), np.uint8)
        rgb[..., 0] = np.array(LEVELS, np.uint8)[np.where(mask == 255, 0, mask)]
        Image.fromarray(rgb).save(root / "JPEGImages" / f"im{i}.png")  # lossless: the red value names the class
        (root / "JPEGImages" / f"im{i}.png").rename(root / "JPEGImages" / f"im{i}.jpg")
        pal = Image.fromarray(mask, mode="P")
        pal.putpalette(PALETTE)
        pal.save(root / "SegmentationClass" / f"im{i}.png")
        names.append(f"im{i}")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(names) + "\n")
    (root / "class_names.txt").write_text("background\ncircle\nsquare\nstar\n")
    return voc(root)


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = []
    for size in ((40, 40), (40, 72)):  # one window, and three windows that overlap (window 40, stride 16)
        mask = np.zeros(size, np.uint8)
        for cls in (1, 2, 3):
            y, x = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
            mask[y:y + 12, x:x + 12] = cls
        masks.append(mask)
    masks[1][:2, :5] = 255  # ignored pixels
    return masks


SETTINGS = ProtocolSettings(window=40, stride=16, short_side=40, bg_thresh=0.5)


def test_a_grouping_that_follows_the_masks_scores_100_whatever_the_group_ids(tmp_path):
    dataset = _dataset(tmp_path, _masks())
    permuted = RegionModel(lambda cls: (5 - cls) % 8)  # group ids unrelated to class ids
    scores = oracle_confusion(permuted, dataset, SETTINGS).scores()
    assert scores.miou == pytest.approx(1.0) and scores.aacc == pytest.approx(1.0)
    split = RegionModel(lambda cls: cls * 2 + (torch.arange(cls.shape[1]) % 2)[None])  # two groups per class
    assert oracle_confusion(split, dataset, SETTINGS).scores().miou == pytest.approx(1.0)


def test_one_group_for_everything_scores_its_majority_class_only(tmp_path):
    masks = _masks()
    dataset = _dataset(tmp_path, masks)
    scores = oracle_confusion(RegionModel(lambda cls: torch.zeros_like(cls)), dataset, SETTINGS).scores()
    # every window's one group is named background (the majority): background IoU = its share, the rest 0
    valid = np.concatenate([m[m != 255] for m in masks])
    assert scores.iou[0] == pytest.approx((valid == 0).mean())
    assert scores.iou[1:] == [0.0, 0.0, 0.0]
    assert scores.miou == pytest.approx((valid == 0).mean() / 4)


def test_merging_two_classes_into_one_group_loses_the_smaller():
    groups = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    target = torch.tensor([[2, 2, 1, 3], [2, 255, 1, 1]])  # group 1: three 1s and one 3
    assert oracle_labels(groups, target, 4).tolist() == [[2, 2, 1, 1], [2, 2, 1, 1]]
    unlabelled = torch.tensor([[255, 255, 1, 1], [255, 255, 1, 1]])
    assert oracle_labels(groups, unlabelled, 4)[0, 0] == 255  # a group with no labelled pixel names nothing
    tie = torch.tensor([[3, 2, 0, 0], [2, 3, 0, 0]])
    assert oracle_labels(groups, tie, 4)[0, 0] == 2  # a tie: the lower class id


def test_compactness_and_richness_on_made_embeddings():
    from pgseg.analyze import compactness, richness

    # three classes, each a tight cloud around its own axis: intra distances ~0, inter ~1 (orthogonal)
    gen = torch.Generator().manual_seed(0)
    axes = torch.eye(8)[:3]
    classes = torch.arange(3).repeat_interleave(20)
    tight = axes[classes] + 0.01 * torch.randn(60, 8, generator=gen)
    result = compactness(tight, classes, ["a", "b", "c"])
    assert result.intra < 1e-3 and result.inter == pytest.approx(1.0, abs=0.02) and result.ratio < 1e-3
    assert set(result.per_class) == {"a", "b", "c"}
    mixed = torch.randn(60, 8, generator=gen)  # no class structure: intra and inter alike
    assert compactness(mixed, classes, ["a", "b", "c"]).ratio == pytest.approx(1.0, abs=0.1)
    # richness: three used directions give about three effective dimensions; isotropic noise gives most of 8
    assert richness(tight).effective_dims == pytest.approx(2.0, abs=0.1)  # 3 centred points span 2 dimensions
    assert richness(mixed).effective_dims > 5
    assert richness(tight).variances == sorted(richness(tight).variances, reverse=True)
    with pytest.raises(ValueError, match="two groups of one class"):
        compactness(tight[:3], classes[::20], ["a", "b", "c"])
