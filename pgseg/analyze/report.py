"""``pgseg analyze`` as one call: a model on a segmentation set → the oracle-labelled group mIoU beside the
protocol's mIoU (grouping apart from naming), compactness and richness of the group embeddings with their pictures,
and the model's parameters and FLOPs (Table 6); written to a folder as JSON, Markdown and PNGs."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets import SegmentationDataset
from ..evaluate import confusion_in_process
from ..fileio import atomic_write_bytes
from ..metrics import ConfusionMatrix, SegmentationScores
from ..segment import ProtocolSettings, read_image
from .cost import ModelCost, model_cost
from .embedding import (Compactness, Richness, compactness, compactness_plot, richness, richness_plot)
from .oracle import image_windows, oracle_prediction, score_oracle

FILES = ("analysis.json", "analysis.md", "compactness.png", "richness.png", "groups.png")
DRAWN = 8  # images drawn in groups.png


@dataclass
class Analysis:
    dataset: str
    images: int
    settings: ProtocolSettings
    protocol: SegmentationScores  # the zero-shot protocol's labels
    oracle: SegmentationScores  # each group named by the ground truth
    groups: int  # groups that cover labelled pixels (the points of the embedding figures)
    compactness: Compactness | None  # None: too few groups or classes to say
    richness: Richness | None
    cost: ModelCost
    pictures: dict[str, bytes] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "images": self.images, "settings": asdict(self.settings),
                "miou": self.protocol.miou, "oracle_miou": self.oracle.miou,
                "naming_gap": self.oracle.miou - self.protocol.miou, "aacc": self.protocol.aacc,
                "oracle_aacc": self.oracle.aacc, "groups": self.groups,
                "compactness": None if self.compactness is None else asdict(self.compactness),
                "richness": None if self.richness is None else
                {"effective_dims": self.richness.effective_dims, "total_variance": self.richness.total_variance,
                 "variances": self.richness.variances},
                "cost": asdict(self.cost),
                "classes": [{"class": n, "iou": p, "oracle_iou": o} for n, p, o in
                            zip(self.protocol.class_names, self.protocol.iou, self.oracle.iou)]}

    def metrics(self) -> dict[str, float]:
        """The scalars MLflow gets (``analyze/<set>/...``)."""
        prefix = f"analyze/{self.dataset}"
        out = {f"{prefix}/mIoU": self.protocol.miou, f"{prefix}/oracle_mIoU": self.oracle.miou,
               f"{prefix}/params": float(self.cost.params["total"]),
               f"{prefix}/image_gflops": self.cost.gflops["image"]}
        if self.compactness is not None:
            out[f"{prefix}/compactness"] = self.compactness.ratio
        if self.richness is not None:
            out[f"{prefix}/effective_dims"] = self.richness.effective_dims
        return out

    def text(self) -> str:
        def pct(v: float) -> str:
            return "–" if v != v else f"{100 * v:.2f}"

        lines = [f"## {self.dataset}: {self.images} images", "",
                 f"- mIoU (protocol) {pct(self.protocol.miou)}, oracle-group mIoU {pct(self.oracle.miou)}",
                 f"- groups: {self.groups}" + (", compactness: needs two groups of one class and groups of two "
                                              "classes" if self.compactness is None else
                                              f", compactness (intra/inter distance) {self.compactness.ratio:.4f}")
                 + ("" if self.richness is None else f", effective dims {self.richness.effective_dims:.2f}"),
                 f"- parameters {self.cost.params['total']:,} (image {self.cost.params['image']:,}, text "
                 f"{self.cost.params['text']:,}); GFLOPs at {self.cost.image_size}²: image "
                 f"{self.cost.gflops['image']:.3f}, text {self.cost.gflops['text']:.3f}", "",
                 "| class | IoU | oracle IoU |", "|---|---|---|"]
        lines += [f"| {n} | {pct(p)} | {pct(o)} |" for n, p, o in
                  zip(self.protocol.class_names, self.protocol.iou, self.oracle.iou)]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> Path:
        folder = Path(folder) / self.dataset
        atomic_write_bytes(folder / "analysis.json", (json.dumps(self.figures(), indent=1) + "\n").encode())
        atomic_write_bytes(folder / "analysis.md", self.text().encode())
        for name, png in self.pictures.items():
            atomic_write_bytes(folder / name, png)
        return folder


def result_paths(folder: str | Path, dataset: str) -> list[Path]:
    return [Path(folder) / dataset / name for name in FILES]


def group_map(size: tuple[int, int], windows: list) -> torch.Tensor:
    """[h, w] at protocol size: each pixel's group in the last window that covers it (windows row by row)."""
    out = torch.zeros(size, dtype=torch.long)
    for w in windows:
        y0, x0, y1, x1 = w.box
        out[y0:y1, x0:x1] = w.groups + 1  # palette colour 0 is black: groups from 1
    return out


def groups_picture(rows: list[tuple[Any, np.ndarray, torch.Tensor, torch.Tensor]], names: list[str]) -> bytes:
    """image | ground truth | groups (each its own colour) | each group named by the ground truth, per image."""
    import io

    from PIL import Image

    from ..segment import upscale_labels
    from ..visualize import comparison, grid, overlay

    tiles = []
    for image, target, groups, oracle in rows:
        groups = upscale_labels(groups, tuple(target.shape)).long()
        left = comparison(image, target, oracle.clamp(max=len(names) - 1), names)
        drawn = overlay(image, groups, ["group"] * 256, alpha=0.6, legend=False)
        tile = Image.new("RGB", (left.width + drawn.width + 4, max(left.height, drawn.height)), (255, 255, 255))
        tile.paste(left, (0, 0))
        tile.paste(drawn, (left.width + 4, 0))
        tiles.append(tile)
    buf = io.BytesIO()
    grid(tiles, columns=2).save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def analyze(model: torch.nn.Module, dataset: SegmentationDataset, settings: ProtocolSettings,
            image_size: int, max_images: int | None = None) -> Analysis:
    """Everything ``pgseg analyze`` reports for ``model`` on (the first ``max_images`` of) ``dataset``."""
    model.eval()
    if max_images is not None:
        dataset = replace(dataset, samples=dataset.samples[:max_images])
    if not dataset.samples:
        raise ValueError(f"{dataset.name}: no images to analyse")
    n = len(dataset.class_names)
    oracle = ConfusionMatrix(n, class_names=dataset.class_names)
    embeddings, classes, drawn = [], [], []
    for sample in dataset.samples:
        picture = read_image(sample.image)
        image, target = np.asarray(picture), dataset.read_mask(sample)
        windows = image_windows(model, image, target, n, settings)
        named = oracle_prediction(model, image, target, n, settings, windows=windows)
        score_oracle(oracle, named, target, str(sample.mask))
        if len(drawn) < DRAWN:
            drawn.append((picture, target, group_map(*windows), named))
        for w in windows[1]:
            keep = (w.pixels > 0) & (w.classes != 255)
            if w.embeddings is not None and keep.any():
                embeddings.append(w.embeddings[keep].cpu())
                classes.append(w.classes[keep].cpu())
    protocol = confusion_in_process(model, dataset, settings).scores()
    found = torch.cat(embeddings) if embeddings else torch.zeros(0, 1)
    labels = torch.cat(classes) if classes else torch.zeros(0, dtype=torch.long)
    compact = rich = None
    pictures = {"groups.png": groups_picture(drawn, dataset.class_names)}
    if len(labels) >= 2 and labels.unique().numel() >= 2 and torch.bincount(labels).max() >= 2:
        compact = compactness(found, labels, dataset.class_names)
        pictures["compactness.png"] = compactness_plot(found, labels, dataset.class_names, compact)
    if len(labels) >= 2:
        rich = richness(found)
        pictures["richness.png"] = richness_plot(rich)
    return Analysis(dataset.name, len(dataset.samples), settings, protocol, oracle.scores(), len(labels), compact,
                    rich, model_cost(model, image_size), pictures)


__all__ = ["Analysis", "analyze", "result_paths"]
