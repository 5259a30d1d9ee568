"""Zero-shot segmentation evaluation at scale: Ray Data batch inference with model actors (CPU or GPU) over a
dataset of pgseg.datasets, a few samples at a time through pgseg.evaluate.score_samples, confusion matrices summed in
the driver; and zero-shot classification the same way. MLflow logging of the results is in pipelines.tracking."""
from __future__ import annotations

import io
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm

from pgseg.checkpoint import load_model
from pgseg.classify import ZeroShotClassifier, folder_samples, load_image, read_class_names, topk_correct
from pgseg.datasets import SegmentationDataset
from pgseg.evaluate import ClassificationResult, EvalResult, all_background_miou, dataset_segmenter, score_samples
from pgseg.metrics import ConfusionMatrix
from pgseg.segment import ProtocolSettings
from pgseg.visualize import comparison
from pipelines.data.ingest import TarShards, shard_list


class SegmentActor:
    """A Ray Data UDF holding one model for every set of an evaluation: rows (set, id, image path, mask path) →
    confusion counts (and overlays). ``sets``: per set, its class names, protocol settings, mask reader and the
    samples drawn as overlays."""

    def __init__(self, model_path: str, sets: list[dict[str, Any]], true_labels: bool, device: str = "cpu",
                 images_per_batch: int = 4):
        model, _ = load_model(model_path, device)
        self.sets = [{"segmenter": dataset_segmenter(model, s["class_names"], ProtocolSettings(**s["settings"]),
                                                     batch=2 * images_per_batch),
                      "n": len(s["class_names"]), "reader": s["reader"], "overlay_ids": set(s["overlay_ids"])}
                     for s in sets]
        self.true_labels = true_labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scored: list[Any] = [None] * len(batch["id"])
        for index, spec in enumerate(self.sets):  # a batch may hold rows of two sets
            mine = [i for i, s in enumerate(batch["set"]) if s == index]
            if mine:
                results = score_samples(spec["segmenter"], [(batch["image"][i], batch["mask"][i]) for i in mine],
                                        spec["n"], spec["reader"], self.true_labels)  # windows batched together
                for i, result in zip(mine, results):
                    scored[i] = result
        pairs, counts, pictures, errors = [], [], [], []
        for set_index, sid, result in zip(batch["set"], batch["id"], scored):
            if isinstance(result, Exception):  # bad inputs travel back as text: the driver reports them all
                codes, n, labels = np.zeros(0, np.int64), np.zeros(0, np.int64), None
                errors.append(str(result))
            else:
                codes, n, labels, image, target = result
                errors.append("")
            pairs.append(codes.astype(np.int64).tobytes())  # bytes: one column type whatever the lengths
            counts.append(n.astype(np.int64).tobytes())
            spec = self.sets[set_index]
            if sid in spec["overlay_ids"] and labels is not None:
                buf = io.BytesIO()
                comparison(image, target, labels, spec["segmenter"].names).save(buf, format="PNG")
                pictures.append(buf.getvalue())
            else:
                pictures.append(b"")
        return {"set": batch["set"], "id": batch["id"], "pairs": np.array(pairs, dtype=object),
                "counts": np.array(counts, dtype=object), "overlay": np.array(pictures, dtype=object),
                "error": np.array(errors, dtype=object)}


def evaluate_many(model_path: str, plans: list[tuple[SegmentationDataset, ProtocolSettings]], *, actors: int = 1,
                  use_gpu: bool = False, cpus_per_actor: float = 1.0, true_labels: bool = False,
                  overlays: int = 8, progress: bool | None = None, images_per_batch: int = 4) -> list[EvalResult]:
    """Evaluate one model file on several datasets (each with its protocol settings) on the attached Ray cluster,
    with one pool of model actors for all of them (a model is loaded once per actor); ``progress``: a progress bar
    on stderr (None: when it is a terminal); ``images_per_batch``: images an actor takes at once (their windows
    through the model together). A set with unreadable samples is a ValueError naming them (nothing returned)."""
    rows, sets = [], []
    for index, (dataset, settings) in enumerate(plans):
        mine = [{"set": index, "id": s.id, "image": str(s.image), "mask": str(s.mask)} for s in dataset]
        if not mine:
            raise ValueError(f"{dataset.name}: the dataset is empty")
        rows += mine
        sets.append({"class_names": dataset.class_names, "settings": asdict(settings), "reader": dataset.reader,
                     "overlay_ids": [r["id"] for r in mine[:overlays]]})
    ds = ray.data.from_items(rows).map_batches(
        SegmentActor, batch_size=images_per_batch, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_actor,
        fn_constructor_kwargs={"model_path": str(model_path), "sets": sets, "true_labels": true_labels,
                               "device": "cuda" if use_gpu else "cpu", "images_per_batch": images_per_batch})
    matrices = [ConfusionMatrix(len(d.class_names), class_names=d.class_names) for d, _ in plans]
    pictures: list[dict[str, bytes]] = [{} for _ in plans]
    images = [0] * len(plans)
    errors: list[list[str]] = [[] for _ in plans]
    names = ", ".join(d.name for d, _ in plans)
    with tqdm(total=len(rows), desc=names, unit="image", disable=None if progress is None else not progress,
              file=sys.stderr) as bar:
        for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
            for index, sid, pairs, counts, picture, error in zip(batch["set"], batch["id"], batch["pairs"],
                                                                 batch["counts"], batch["overlay"], batch["error"]):
                if error:
                    errors[index].append(str(error))
                    continue
                matrices[index].matrix.view(-1).index_add_(0, torch.from_numpy(np.frombuffer(pairs, np.int64).copy()),
                                                           torch.from_numpy(np.frombuffer(counts, np.int64).copy()))
                images[index] += 1
                if picture:
                    pictures[index][str(sid)] = picture
            bar.update(len(batch["id"]))
    for (dataset, _), bad in zip(plans, errors):  # nothing is logged from a dataset with unreadable samples
        if bad:
            bad.sort()
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise ValueError(f"{dataset.name}: {len(bad)} bad sample(s): " + "; ".join(bad[:5]) + more)
    results = []
    for (dataset, settings), matrix, drawn_pictures, count, spec in zip(plans, matrices, pictures, images, sets):
        drawn = [i for i in spec["overlay_ids"] if i in drawn_pictures]
        background_only = settings.bg_thresh is not None and int(matrix.matrix[:, 1:].sum()) == 0
        results.append(EvalResult(dataset.name, matrix.scores(), settings, count, [drawn_pictures[i] for i in drawn],
                                  all_background_miou(matrix, settings), drawn, background_only))
    return results


def evaluate(model_path: str, dataset: SegmentationDataset, settings: ProtocolSettings, **options: Any) -> EvalResult:
    """One dataset's :func:`evaluate_many`."""
    return evaluate_many(model_path, [(dataset, settings)], **options)[0]


class ClassifyActor:
    """A Ray Data UDF holding one model: rows (image bytes or path, label) → top-1 / top-5 hits."""

    def __init__(self, model_path: str, class_names: list[str], device: str = "cpu"):
        model, _ = load_model(model_path, device)
        self.classifier = ZeroShotClassifier(model, class_names)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
    path = Path(source)
    if path.is_dir() and not list(path.glob("*.tar")):
        folders, samples = folder_samples(path)
        names = read_class_names(class_names_file, folders)
        ds = ray.data.from_items([{"image": p, "label": label} for p, label in samples])
    else:
        names = read_class_names(class_names_file)
        shards = shard_list([source])
        raw = ray.data.read_datasource(TarShards(shards))  # a damaged shard: its samples, then a named problem

        def rows(batch):
            n = len(batch["__key__"])
            damage = batch["__error__"] if "__error__" in batch else [None] * n
            labels = [(-1, f"{url}: {err} (after its last good sample)") if isinstance(err, str) else
                      _label(c, k, len(names))
                      for c, k, err, url in zip(batch.get("cls", [None] * n), batch["__key__"], damage, batch["__url__"])]
            images = batch.get("jpg", [None] * n)  # a break's row has none (NaN)
            return {"image": np.array([x if isinstance(x, bytes) else b"" for x in images], dtype=object),
                    "label": np.array([l for l, _ in labels]),
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
