"""Small helpers of the training tests: a tiny run's config on the session's shapes shards, a checkpoint's state,
a metric's history read back from MLflow."""
from __future__ import annotations

from pathlib import Path

import torch

from pgseg.config import load_config
from pgseg.train import STATE_FILE

BASE = ["data.batch_size=16", "schedule.epochs=1", "schedule.warmup_epochs=0.25", "train.cpus_per_worker=0.5",
        "tracking.log_every=1", "train.checkpoint_every=4"]


def tiny_config(shapes_data, tmp_path, *overrides, tracking=None):
    sets = [*BASE, f"data.shards=[{shapes_data['shards']}]", f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.uri={tracking or 'sqlite:///' + str(tmp_path / 'mlflow.db')}", *overrides]
    return load_config("tiny", sets)


def checkpoint_state(checkpoint_path):
    return torch.load(Path(checkpoint_path) / STATE_FILE, map_location="cpu", weights_only=True)


def history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))
