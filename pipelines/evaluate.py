"""Zero-shot segmentation evaluation at scale: Ray Data batch inference with model actors (CPU or GPU) over a
dataset of pgseg.datasets, the protocol of pgseg.segment, confusion matrices summed in the driver, the table printed
and logged to MLflow (mIoU, per-class IoU table, settings, a grid of overlays)."""
from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pgseg.datasets import SegmentationDataset
from pgseg.metrics import ConfusionMatrix, SegmentationScores
from pgseg.segment import ProtocolSettings

log = logging.getLogger(__name__)


class SegmentActor:
    """A Ray Data UDF holding one model: rows (id, image path, mask path) → confusion counts (and overlays)."""

    def __init__(self, model_path: str, class_names: list[str], settings: dict[str, Any], reader: str,
                 true_labels: bool, overlay_ids: list[str], device: str = "cpu"):
        from pgseg.checkpoint import load_model
        from pgseg.segment import Segmenter

        model, _ = load_model(model_path, device)
        self.bg = settings.get("bg_thresh") is not None
        names = class_names[1:] if self.bg else class_names  # the prompts: foreground classes only
        self.segmenter = Segmenter(model, names, ProtocolSettings(**settings))
        self.n, self.reader, self.true_labels = len(class_names), reader, true_labels
        self.overlay_ids, self.device = set(overlay_ids), device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pgseg.datasets import read_mask
        from pgseg.segment import read_image, to_tensor
        from pgseg.visualize import overlay

        pairs, counts, pictures = [], [], []
        for sid, image_path, mask_path in zip(batch["id"], batch["image"], batch["mask"]):
            image = read_image(image_path)
            target = read_mask(mask_path, self.n, self.reader)
            if target.shape != (image.height, image.width):
                raise ValueError(f"{mask_path}: mask {target.shape} and image {(image.height, image.width)} differ")
            candidates = None
            if self.true_labels:  # True Label Guidance: only the classes of the ground truth compete
                present = np.unique(target[(target != 255) & (target > (0 if self.bg else -1))])
                candidates = [int(c) - (1 if self.bg else 0) for c in present] or None
            labels = self.segmenter(to_tensor(image).to(self.device), candidates).labels.numpy()
            valid = target != 255
            codes = target[valid].astype(np.int64) * self.n + labels[valid]
            u, c = np.unique(codes, return_counts=True)
            pairs.append(u)
            counts.append(c)
            if sid in self.overlay_ids:
                buf = io.BytesIO()
                overlay(image, labels, self.segmenter.names).save(buf, format="PNG")
                pictures.append(buf.getvalue())
            else:
                pictures.append(b"")
        return {"id": batch["id"], "pairs": np.array(pairs, dtype=object), "counts": np.array(counts, dtype=object),
                "overlay": np.array(pictures, dtype=object)}


@dataclass
class EvalResult:
    dataset: str
    scores: SegmentationScores
    settings: ProtocolSettings
    images: int
    overlays: list[bytes] = field(default_factory=list)

    def table_text(self) -> str:
        lines = [f"{self.dataset}: mIoU {100 * self.scores.miou:.2f}  mAcc {100 * self.scores.macc:.2f}  "
                 f"aAcc {100 * self.scores.aacc:.2f}  ({self.images} images)",
                 f"{'class':24}{'IoU':>8}{'Acc':>8}"]
        for row in self.scores.table():
            lines.append(f"{str(row['class'])[:24]:24}{100 * row['iou']:8.2f}{100 * row['accuracy']:8.2f}")
        return "\n".join(lines)


def evaluate(model_path: str, dataset: SegmentationDataset, settings: ProtocolSettings, *, actors: int = 1,
             use_gpu: bool = False, cpus_per_actor: float = 1.0, true_labels: bool = False,
             overlays: int = 8) -> EvalResult:
    """Evaluate one model file on one dataset on the attached Ray cluster."""
    import ray

    rows = [{"id": s.id, "image": str(s.image), "mask": str(s.mask)} for s in dataset]
    if not rows:
        raise ValueError(f"{dataset.name}: the dataset is empty")
    overlay_ids = [r["id"] for r in rows[:overlays]]
    ds = ray.data.from_items(rows).map_batches(
        SegmentActor, batch_size=1, concurrency=actors, num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_actor,
        fn_constructor_kwargs={"model_path": str(model_path), "class_names": dataset.class_names,
                               "settings": asdict(settings), "reader": dataset.reader, "true_labels": true_labels,
                               "overlay_ids": overlay_ids, "device": "cuda" if use_gpu else "cpu"})
    matrix = ConfusionMatrix(len(dataset.class_names), class_names=dataset.class_names)
    flat = matrix.matrix.view(-1)
    pictures: dict[str, bytes] = {}
    images = 0
    import torch

    try:
        batches = list(ds.iter_batches(batch_size=16, batch_format="numpy"))
    except Exception as exc:  # noqa: BLE001 - a bad image or mask inside an actor: its own message, not Ray's
        cause = _user_error(exc)
        if cause is None:
            raise
        raise ValueError(str(cause)) from None
    for batch in batches:
        for sid, pairs, counts, picture in zip(batch["id"], batch["pairs"], batch["counts"], batch["overlay"]):
            flat.index_add_(0, torch.as_tensor(pairs, dtype=torch.long), torch.as_tensor(counts, dtype=torch.long))
            images += 1
            if picture:
                pictures[str(sid)] = picture
    return EvalResult(dataset.name, matrix.scores(), settings, images, [pictures[i] for i in overlay_ids if i in pictures])


def _user_error(exc: BaseException) -> BaseException | None:
    """The ValueError/FileNotFoundError raised by our code inside a Ray task, found in the exception chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ValueError, FileNotFoundError)) and type(exc).__module__ == "builtins":
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def log_to_mlflow(result: EvalResult, uri: str, *, run_id: str | None = None, experiment: str = "pgseg-eval",
                  run_name: str | None = None, step: int | None = None) -> str:
    """mIoU / mAcc / aAcc, the per-class table (log_table, and a Markdown copy), the settings and a grid of
    overlays; into ``run_id`` (e.g. the training run) or a new run."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pgseg.visualize import grid

    client = MlflowClient(uri)
    if run_id is None:
        experiment_obj = client.get_experiment_by_name(experiment)
        exp_id = experiment_obj.experiment_id if experiment_obj else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=run_name or f"eval-{result.dataset}").info.run_id
    name = result.dataset
    s = result.scores
    client.log_metric(run_id, f"eval/{name}/mIoU", s.miou, step=step or 0)
    client.log_metric(run_id, f"eval/{name}/mAcc", s.macc, step=step or 0)
    client.log_metric(run_id, f"eval/{name}/aAcc", s.aacc, step=step or 0)
    rows = s.table()
    client.log_table(run_id, {"class": [r["class"] for r in rows], "iou": [r["iou"] for r in rows],
                              "accuracy": [r["accuracy"] for r in rows]}, f"eval/{name}_iou.json")
    client.log_text(run_id, result.table_text(), f"eval/{name}_iou.md")
    client.log_dict(run_id, {**asdict(result.settings), "images": result.images}, f"eval/{name}_settings.json")
    if result.overlays:
        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in result.overlays]
        client.log_image(run_id, grid(pictures), f"eval/{name}_overlays.png")
    return run_id
