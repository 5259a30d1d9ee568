"""MLflow tracking helpers (runs from the driver / rank 0 only). Default URI ``sqlite:///mlflow.db``; any MLflow
server by URI."""
from __future__ import annotations

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
