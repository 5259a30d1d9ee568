"""Zero-shot segmentation evaluation at scale: Ray Data batch inference with model actors (CPU or GPU) over a
dataset of pgseg.datasets, the protocol of pgseg.segment, confusion matrices summed in the driver, the table printed
and logged to MLflow (mIoU, per-class IoU table, settings, a grid of overlays)."""
from __future__ import annotations

import io
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pgseg.datasets import SegmentationDataset
from pgseg.metrics import ConfusionMatrix, SegmentationScores
from pgseg.segment import ProtocolSettings

log = logging.getLogger(__name__)


def _segmenter(model: Any, class_names: list[str], settings: ProtocolSettings):
    from pgseg.segment import Segmenter

    names = class_names[1:] if settings.bg_thresh is not None else class_names  # prompts: foreground classes only
    return Segmenter(model, names, settings)


def score_sample(segmenter: Any, image_path: str, mask_path: str, num_classes: int, reader: str,
                 true_labels: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any, np.ndarray]:
    """One sample through the protocol: (confusion codes, their counts, predicted labels, the image, the ground
    truth). Codes are ``target * num_classes + prediction`` over the pixels that are not 255."""
    from pgseg.datasets import read_mask
    from pgseg.segment import read_image

    image = read_image(image_path)
    target = read_mask(mask_path, num_classes, reader)
    if target.shape != (image.height, image.width):
        raise ValueError(f"{mask_path}: mask {target.shape} and image {(image.height, image.width)} differ")
    bg = segmenter.settings.bg_thresh is not None
    candidates = None
    if true_labels:  # True Label Guidance: only the classes of the ground truth compete
        present = np.unique(target[(target != 255) & (target > (0 if bg else -1))])
        candidates = [int(c) - (1 if bg else 0) for c in present] or None
    labels = segmenter(image, candidates).labels.numpy()
    valid = target != 255
    codes, counts = np.unique(target[valid].astype(np.int64) * num_classes + labels[valid], return_counts=True)
    return codes, counts, labels, image, target


class SegmentActor:
    """A Ray Data UDF holding one model: rows (id, image path, mask path) → confusion counts (and overlays)."""

    def __init__(self, model_path: str, class_names: list[str], settings: dict[str, Any], reader: str,
                 true_labels: bool, overlay_ids: list[str], device: str = "cpu"):
        from pgseg.checkpoint import load_model

        model, _ = load_model(model_path, device)
        self.segmenter = _segmenter(model, class_names, ProtocolSettings(**settings))
        self.n, self.reader, self.true_labels = len(class_names), reader, true_labels
        self.overlay_ids = set(overlay_ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pgseg.visualize import comparison

        pairs, counts, pictures, errors = [], [], [], []
        for sid, image_path, mask_path in zip(batch["id"], batch["image"], batch["mask"]):
            try:  # bad inputs travel back as text: the driver reports them all, in our words, not Ray's
                codes, n, labels, image, target = score_sample(self.segmenter, image_path, mask_path, self.n,
                                                               self.reader, self.true_labels)
            except (ValueError, OSError) as exc:
                codes, n, labels, image, target = np.zeros(0, np.int64), np.zeros(0, np.int64), None, None, None
                errors.append(str(exc))
            else:
                errors.append("")
            pairs.append(codes.astype(np.int64).tobytes())  # bytes: one column type whatever the lengths
            counts.append(n.astype(np.int64).tobytes())
            if sid in self.overlay_ids and labels is not None:
                buf = io.BytesIO()
                comparison(image, target, labels, self.segmenter.names).save(buf, format="PNG")
                pictures.append(buf.getvalue())
            else:
                pictures.append(b"")
        return {"id": batch["id"], "pairs": np.array(pairs, dtype=object), "counts": np.array(counts, dtype=object),
                "overlay": np.array(pictures, dtype=object), "error": np.array(errors, dtype=object)}


def _all_background_miou(matrix: ConfusionMatrix, settings: ProtocolSettings) -> float:
    """The baseline beside a model's mIoU: label 0 everywhere (nan without a background class)."""
    return matrix.constant_prediction(0).scores().miou if settings.bg_thresh is not None else float("nan")


def evaluate_in_process(model: Any, dataset: SegmentationDataset, settings: ProtocolSettings,
                        true_labels: bool = False) -> tuple[SegmentationScores, float]:
    """The same figures without Ray, in this process (evaluation during training on a small held-out set):
    (scores, all-background mIoU)."""
    import torch

    segmenter = _segmenter(model, dataset.class_names, settings)
    matrix = ConfusionMatrix(len(dataset.class_names), class_names=dataset.class_names)
    flat = matrix.matrix.view(-1)
    for sample in dataset:
        codes, counts, *_ = score_sample(segmenter, str(sample.image), str(sample.mask), len(dataset.class_names),
                                           dataset.reader, true_labels)
        flat.index_add_(0, torch.as_tensor(codes), torch.as_tensor(counts))
    return matrix.scores(), _all_background_miou(matrix, settings)


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
        from pgseg.fileio import atomic_write_bytes, atomic_write_json

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


def evaluate(model_path: str, dataset: SegmentationDataset, settings: ProtocolSettings, *, actors: int = 1,
             use_gpu: bool = False, cpus_per_actor: float = 1.0, true_labels: bool = False,
             overlays: int = 8, progress: bool | None = None) -> EvalResult:
    """Evaluate one model file on one dataset on the attached Ray cluster; ``progress``: a progress bar on stderr
    (None: when it is a terminal)."""
    import ray

    rows = [{"id": s.id, "image": str(s.image), "mask": str(s.mask)} for s in dataset]
    if not rows:
        raise ValueError(f"{dataset.name}: the dataset is empty")
    overlay_ids = [r["id"] for r in rows[:overlays]]
    ds = ray.data.from_items(rows).map_batches(
        SegmentActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_actor,
        fn_constructor_kwargs={"model_path": str(model_path), "class_names": dataset.class_names,
                               "settings": asdict(settings), "reader": dataset.reader, "true_labels": true_labels,
                               "overlay_ids": overlay_ids, "device": "cuda" if use_gpu else "cpu"})
    matrix = ConfusionMatrix(len(dataset.class_names), class_names=dataset.class_names)
    flat = matrix.matrix.view(-1)
    pictures: dict[str, bytes] = {}
    images = 0
    import torch

    from tqdm import tqdm

    errors: list[str] = []
    with tqdm(total=len(rows), desc=dataset.name, unit="image", disable=None if progress is None else not progress, file=sys.stderr) as bar:
        for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
            errors += [str(e) for e in batch["error"] if e]
            for sid, pairs, counts, picture in zip(batch["id"], batch["pairs"], batch["counts"], batch["overlay"]):
                flat.index_add_(0, torch.from_numpy(np.frombuffer(pairs, np.int64).copy()),
                                torch.from_numpy(np.frombuffer(counts, np.int64).copy()))
                images += 1
                if picture:
                    pictures[str(sid)] = picture
            bar.update(len(batch["id"]))
    if errors:  # nothing is logged from a dataset with unreadable images or masks
        errors.sort()
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError(f"{dataset.name}: {len(errors)} bad sample(s): " + "; ".join(errors[:5]) + more)
    drawn = [i for i in overlay_ids if i in pictures]
    background_only = settings.bg_thresh is not None and int(matrix.matrix[:, 1:].sum()) == 0
    return EvalResult(dataset.name, matrix.scores(), settings, images, [pictures[i] for i in drawn],
                      _all_background_miou(matrix, settings), drawn, background_only)


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
    if result.baseline_miou == result.baseline_miou:  # not nan
        client.log_metric(run_id, f"eval/{name}/all_background_mIoU", result.baseline_miou, step=step or 0)
    rows = s.table()
    client.log_table(run_id, {"class": [r["class"] for r in rows], "iou": [r["iou"] for r in rows],
                              "accuracy": [r["accuracy"] for r in rows]}, f"eval/{name}_iou.json")
    client.log_text(run_id, result.table_text(), f"eval/{name}_iou.md")
    client.log_dict(run_id, {**asdict(result.settings), "images": result.images}, f"eval/{name}_settings.json")
    if result.overlays:
        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in result.overlays]
        client.log_image(run_id, grid(pictures), f"eval/{name}_overlays.png")
    return run_id


# ------------------------------------------------------------------------------------------------ classification
class ClassifyActor:
    """A Ray Data UDF holding one model: rows (image bytes or path, label) → top-1 / top-5 hits."""

    def __init__(self, model_path: str, class_names: list[str], device: str = "cpu"):
        from pgseg.checkpoint import load_model
        from pgseg.classify import ZeroShotClassifier

        model, _ = load_model(model_path, device)
        self.classifier = ZeroShotClassifier(model, class_names)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pgseg.classify import load_image, topk_correct

        images, labels, errors = [], [], []
        problems = batch.get("problem", [""] * len(batch["label"]))
        for data, label, problem in zip(batch["image"], batch["label"], problems):
            if problem:
                errors.append(str(problem))
                continue
            try:
                images.append(load_image(data if isinstance(data, (bytes, str)) else bytes(data), self.classifier.size))
                labels.append(int(label))
            except ValueError as exc:
                errors.append(str(exc))
        hits = {1: 0, 5: 0}
        if images:
            hits = topk_correct(self.classifier(torch.stack(images)), torch.tensor(labels))
        return {"top1": np.array([hits[1]]), "top5": np.array([hits[5]]), "images": np.array([len(images)]),
                "error": np.array(["; ".join(errors)], dtype=object)}


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


def _label(raw: Any, key: str, classes: int) -> tuple[int, str]:
    """A shard's ``cls`` member → (label, "") or (-1, what is wrong with it)."""
    try:
        label = int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except (TypeError, ValueError):
        return -1, f"sample {key}: label {raw!r} is not an integer"
    if not 0 <= label < classes:
        return -1, f"sample {key}: label {label} is outside 0..{classes - 1}"
    return label, ""


def evaluate_classification(model_path: str, source: str, class_names_file: str, *, actors: int = 1,
                            use_gpu: bool = False, batch_size: int = 64) -> ClassificationResult:
    """Zero-shot classification accuracy of a model file on ``source``: a class-folder tree, or webdataset shards
    (a .tar, a folder of them, a glob or a shard manifest) with ``jpg`` and ``cls`` members."""
    import ray

    from pgseg.classify import folder_samples, read_class_names

    path = Path(source)
    if path.is_dir() and not list(path.glob("*.tar")):
        folders, samples = folder_samples(path)
        names = read_class_names(class_names_file, folders)
        ds = ray.data.from_items([{"image": p, "label": label} for p, label in samples])
    else:
        from pipelines.ingest import shard_list

        names = read_class_names(class_names_file)
        shards = shard_list([source])
        raw = ray.data.read_webdataset(shards, decoder=None)

        def rows(batch):
            labels = [_label(c, k, len(names)) for c, k in zip(batch["cls"], batch["__key__"])]
            return {"image": batch["jpg"], "label": np.array([l for l, _ in labels]),
                    "problem": np.array([e for _, e in labels], dtype=object)}

        ds = raw.map_batches(rows, batch_format="numpy")
    ds = ds.map_batches(ClassifyActor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if use_gpu else 0,
                        fn_constructor_kwargs={"model_path": str(model_path), "class_names": names,
                                               "device": "cuda" if use_gpu else "cpu"})
    top1 = top5 = images = 0
    errors = []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        top1, top5, images = top1 + int(b["top1"].sum()), top5 + int(b["top5"].sum()), images + int(b["images"].sum())
        errors += [e for e in b["error"] if e]
    if errors:
        raise ValueError(f"{source}: bad samples: " + "; ".join(errors[:5]))
    if not images:
        raise ValueError(f"{source}: no images")
    name = path.name if path.name else str(path)
    return ClassificationResult(name.removesuffix(".tar"), top1 / images, top5 / images, images, len(names))


def log_classification(result: ClassificationResult, uri: str, *, run_id: str | None = None,
                       experiment: str = "pgseg-eval") -> str:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import _experiment_id

    client = MlflowClient(uri)
    if run_id is None:
        run_id = client.create_run(_experiment_id(client, experiment), run_name=f"eval-{result.dataset}").info.run_id
    client.log_metric(run_id, f"eval/{result.dataset}/top1", result.top1)
    client.log_metric(run_id, f"eval/{result.dataset}/top5", result.top5)
    client.log_text(run_id, result.table_text(), f"eval/{result.dataset}_classification.txt")
    return run_id
