"""Trained models as MLflow models. Each checkpoint a training run keeps becomes a ``LoggedModel`` of that run: a
``pyfunc`` that runs the zero-shot protocol (an image and a class list in; the mask, its label names and the class
areas out), with its step, the metrics reported with it (as ``metric.*`` parameters) and the shards it was trained
on. The best of them by the selection metric is registered under the config's name with the alias ``champion``, so that
``mlflow models serve -m models:/NAME@champion --env-manager local`` serves it (pgseg must be installed where it
is served: the model carries its weights and config, not our code)."""
from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

log = logging.getLogger(__name__)

CHAMPION = "champion"


def signature(bg_thresh: float) -> ModelSignature:
    """The model's inputs, outputs and its one parameter: ``bg_thresh`` (the model's own threshold by default)."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "classes")]),
        outputs=Schema([ColSpec("string", "mask_png"), ColSpec("string", "labels"), ColSpec("string", "areas")]),
        params=ParamSchema([ParamSpec("bg_thresh", "double", bg_thresh)]))


# what the model needs where it is served (pgseg itself comes from the serving environment)
REQUIREMENTS = ("torch", "torchvision", "timm", "open_clip_torch", "scipy", "numba", "lapx", "numpy", "pyyaml",
                "safetensors", "pillow", "opencv-python-headless")


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """The zero-shot protocol as a pyfunc. Input: a DataFrame with ``image`` (the bytes of an image file; base64 in
    a JSON request) and ``classes`` (comma-separated names), one row per image. Output, per row: ``mask_png`` (a
    palette PNG, pixel value = label id, base64), ``labels`` (JSON list: the name of each id) and ``areas`` (JSON:
    fraction of the image per label). Parameter ``bg_thresh`` in [0, 1] (0: no background pixel). A row whose image
    cannot be read or whose class list is bad raises a ValueError naming the row and the problem (the scoring
    server answers it with a 4xx)."""

    def load_context(self, context: Any) -> None:
        from pgseg.checkpoint import load_model

        self.model, self.config = load_model(context.artifacts["model"], "cpu")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pgseg.segment import (ProtocolSettings, Segmenter, background_threshold, clean_class_names, label_areas,
                                   read_image, segment_image)
        from pgseg.visualize import palette_mask, png_bytes

        chosen = (params or {}).get("bg_thresh")
        settings = ProtocolSettings.of(self.config.eval, background_threshold(  # out of [0, 1]: a ConfigError
            None if chosen is None else float(chosen), self.config.eval))
        out = []
        for i, row in enumerate(model_input.itertuples(index=False)):
            try:
                names = clean_class_names(str(row.classes))
                image = read_image(bytes(row.image))
            except ValueError as exc:
                raise ValueError(f"row {i}: {exc}") from None
            labels, result, _ = segment_image(Segmenter(self.model, names, settings), image)
            out.append({"mask_png": base64.b64encode(png_bytes(palette_mask(labels))).decode(),
                        "labels": json.dumps(result.names), "areas": json.dumps(label_areas(labels, result.names))})
        return pd.DataFrame(out, columns=["mask_png", "labels", "areas"])


def decode_mask(mask_png: str) -> Any:
    """A ``mask_png`` answer → the label map as a numpy array [H, W]."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(mask_png))))


@dataclass
class KeptModel:
    step: int
    model_id: str
    metrics: dict[str, float]


def example_input() -> tuple[bytes, str]:
    """The input example logged with each model: a small PNG (a disc on a plain ground) and a class list."""
    from PIL import Image, ImageDraw

    from pgseg.visualize import png_bytes

    picture = Image.new("RGB", (96, 64), (70, 130, 180))
    ImageDraw.Draw(picture).ellipse((28, 12, 68, 52), fill=(220, 60, 40))
    return png_bytes(picture), "circle, sky"


def requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def log_kept_models(run_id: str, uri: str, checkpoints: Sequence[tuple[Any, dict[str, Any]]], config: Any,
                    example_image: bytes, example_classes: str) -> list[KeptModel]:
    """Each (Ray Train checkpoint, its reported metrics) as a LoggedModel of ``run_id``: the model exported in our
    format; its step, the numeric metrics reported with it and the shards as parameters."""
    from pgseg.segment import background_threshold
    from pgseg.train import export_model

    mlflow.set_tracking_uri(uri)
    kept = []
    example = pd.DataFrame({"image": [example_image], "classes": [example_classes]})
    with tempfile.TemporaryDirectory(prefix="pgseg-models-") as tmp, mlflow.start_run(run_id=run_id):
        for n, (checkpoint, reported) in enumerate(sorted(checkpoints, key=lambda c: int(c[1].get("step", 0)))):
            step = int(reported.get("step", 0))
            target = Path(tmp) / f"model_{n}.safetensors"
            with checkpoint.as_directory() as folder:
                export_model(folder, config, target)
            metrics = {k: float(v) for k, v in reported.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            info = mlflow.pyfunc.log_model(
                name=f"model-step-{step}", python_model=SegmentationModel(), artifacts={"model": str(target)},
                signature=signature(background_threshold(None, config.eval)), input_example=example,
                pip_requirements=requirements(), step=step,
                params={"step": str(step), "data.shards": json.dumps([str(s) for s in config.data.shards]),
                        "checkpoint": str(checkpoint.path),
                        # the run has these at this step already: linked again as metrics, they would appear
                        # twice in its history (MLflow writes a model's metrics into its run's too)
                        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()}},
                tags={"pgseg.kind": "checkpoint"})
            kept.append(KeptModel(step, info.model_id, metrics))
    return kept


def register_champion(kept: Sequence[KeptModel], uri: str, name: str, metric: str) -> tuple[KeptModel, str]:
    """Register the best of ``kept`` by ``metric`` (higher is better; the latest where none has it, or on a tie)
    under ``name`` and point the alias ``champion`` at it: (the model, its version)."""
    if not kept:
        raise ValueError("no kept model to register")
    scored = [m for m in kept if metric in m.metrics]
    best = max(scored or kept, key=lambda m: (m.metrics.get(metric, float("-inf")), m.step))
    if not scored:
        log.warning("no kept model reported %s: registering the latest (step %d)", metric, best.step)
    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(f"models:/{best.model_id}", name, tags={"pgseg.step": str(best.step)})
    client = mlflow.MlflowClient(uri)
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return best, str(version.version)


def download_model_file(uri: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """The pgseg model file inside an MLflow model (``models:/NAME@champion``, ``models:/m-…``, ``runs:/…``),
    downloaded from the tracking server (``tracking_uri``, else $MLFLOW_TRACKING_URI) into ``dst`` (else a new
    temporary folder)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=None if dst is None else str(dst)))
    except mlflow.exceptions.MlflowException as exc:
        raise FileNotFoundError(f"{uri}: {str(exc).splitlines()[0]}") from None
    files = sorted(local.rglob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{uri}: expected one pgseg model file (.safetensors) in it, found {len(files)}")
    return files[0]
