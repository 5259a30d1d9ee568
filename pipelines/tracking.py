"""MLflow tracking helpers (runs from the driver / rank 0 only). Default URI ``sqlite:///mlflow.db``; any MLflow
server by URI."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def log_manifest(manifest: dict[str, Any], *, uri: str, experiment: str = "pgseg-data",
                 run_name: str = "download", params: dict[str, Any] | None = None) -> str:
    """One MLflow run for a download: the manifest's figures as metrics, the manifest itself as an artifact."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics = {"samples": manifest["samples"], "attempted": manifest["attempted"],
                   "success_rate": manifest["success_rate"], "shards": manifest["num_shards"]}
        metrics.update({f"failures.{k.replace(':', '_').replace(' ', '_')[:200]}": v
                        for k, v in manifest["failures"].items()})
        mlflow.log_metrics(metrics)
        mlflow.log_dict(manifest, "manifest.json")
        return run.info.run_id


# ------------------------------------------------------------------------------------------------ training runs
RUN_KEY_TAG = "pgseg.run_key"


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the checkout holding this code (None outside a git checkout or without git)."""
    import subprocess

    root = Path(path) if path else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use: the configured one, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``;
    a relative sqlite path made absolute, so Ray workers with another working folder find the same file."""
    import os

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def create_run(client: Any, exp_id: str, run_name: str, tags: dict[str, str],
               params: dict[str, Any] | None = None) -> str:
    """A new MLflow run with ``tags``, the commit of this checkout and ``params`` (in batches: MLflow takes at most
    100 per call). Returns its id."""
    from mlflow.entities import Param

    commit = git_commit()
    run_id = client.create_run(exp_id, run_name=run_name, tags={
        **tags, **({"mlflow.source.git.commit": commit} if commit else {})}).info.run_id
    items = [Param(k, str(v)[:6000]) for k, v in sorted((params or {}).items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id


def start_training_run(uri: str, experiment: str, run_name: str, run_key: str, params: dict[str, Any],
                       config_yaml: str, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The MLflow run of a training run: found again by its key (storage folder + name) when the run continues,
    created otherwise with the flattened config as params, ``tags`` (e.g. ``mlflow.parentRunId``) and the resolved
    config as an artifact. Returns (run id, whether it was resumed)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = _experiment_id(client, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    run_id = create_run(client, exp_id, run_name, {**(tags or {}), RUN_KEY_TAG: run_key}, params)
    client.log_text(run_id, config_yaml, "config.yaml")
    return run_id, False


def finish_training_run(uri: str, run_id: str, status: str, tags: dict[str, str] | None = None,
                        artifacts: list[str | Path] = ()) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status)


class MetricLogger:
    """Rank 0's metric stream into one MLflow run: buffered, flushed in batches; after a restart, the steps that
    the run already holds are not logged again (one value per step on every curve)."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 10, watch: str = "loss"):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.flush_every = MlflowClient(uri), run_id, flush_every
        history = self.client.get_metric_history(run_id, watch)
        self.floor = max((m.step for m in history), default=-1)  # steps <= floor are already logged
        self.buffer: list[Any] = []
        self.errors = 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import math
        import time

        from mlflow.entities import Metric

        if step <= self.floor:
            return
        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if len(self.buffer) >= 500 or step % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        import logging

        while self.buffer:
            chunk, self.buffer = self.buffer[:1000], self.buffer[1000:]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:  # noqa: BLE001 - tracking must not kill training; counted and reported
                self.errors += 1
                logging.getLogger(__name__).warning("MLflow: %d metric values not logged (%s)", len(chunk), exc)
