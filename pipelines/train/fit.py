"""``fit``: one training run on the attached Ray cluster — a ``TorchTrainer`` over the ingest's dataset, DDP
(gloo on CPU, NCCL on GPU), checkpoints through ``ray.train.report``, resume by run name, worker restarts from the
latest checkpoint, metrics from rank 0 into one MLflow run, and the final model exported in our format."""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pgseg.config import dump_config, flatten, to_dict
from pgseg.train import export_model, scaled_rates, warmup_steps
from pipelines.data.ingest import Ingest, key_maps
from pipelines.rendezvous import torch_config
from pipelines.runtime import check_resources, cluster_resources, on_loopback, train_log_level
from pipelines.tracking import Tracker, start_training_run
from pipelines.train.faults import FAULT_ENV, parse_faults
from pipelines.train.loop import SETTINGS, LoopSettings, train_loop_per_worker
from pipelines.train.plan import Plan, TrainingError
from pipelines.train.storage import check_storage, cluster_nodes

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"  # the final model, in our format (pgseg.checkpoint.load_model reads it)
BEST_MODEL_FILE = "model_best.safetensors"  # the model with the best eval.datasets[0] mIoU during training


@dataclass
class TrainResult:
    name: str
    step: int
    total_steps: int
    finished: bool
    checkpoint: str | None  # the latest checkpoint's path or URI
    model_file: str | None  # the final model in our format (local storage)
    run_id: str | None  # the MLflow run
    metrics: dict[str, Any]
    champion: str | None = None  # the registered best kept model, models:/NAME@champion


def fit(plan: Plan, *, callbacks: list[Any] = (), run_tags: dict[str, str] | None = None,
        run_params: dict[str, Any] | None = None, fresh: bool = False,
        model_dir: str | Path | None = None, end_failed_run: bool = True) -> TrainResult:
    """Train on the attached Ray cluster. ``callbacks`` are Ray Train callbacks (a sweep's ``TuneReportCallback``);
    ``run_tags`` and ``run_params`` go on a new MLflow run besides the config. ``fresh``: a new MLflow run even when
    one of this run's key exists (its storage folder was started over). The final model is exported into
    ``model_dir``, else the run's folder when it is local, else a new temporary folder. ``end_failed_run=False``
    leaves a failed run's MLflow run for the caller to end: a sweep ends its trials' runs itself, since a trial its
    scheduler stops fails while its actor dies, and that late FAILED would overwrite the sweep's KILLED."""
    config, t = plan.config, plan.config.train
    check_resources(config, *cluster_resources())
    check_storage(plan.storage_path, t.shared_storage, cluster_nodes())
    ingest = Ingest(plan.shards, config.data.img_size, config.model.text.context_length, config.data.min_scale,
                    config.data.weights, config.data.seed, train=config.data.augment,
                    multi_label=config.loss.multi_label, noun_vocabulary=config.loss.noun_vocabulary,
                    deterministic=t.deterministic, keys=key_maps(config.data.shards))
    tracker = Tracker(config.tracking.uri, check=True) if config.tracking.enabled else None
    uri = tracker.uri if tracker else None
    run_id = None
    if tracker:
        rates = scaled_rates(config, plan.global_batch)  # the rates optim.* and schedule.* resolve to
        params = {**flatten(to_dict(config)), "run.name": plan.name, "run.steps_per_epoch": plan.steps_per_epoch,
                  "run.total_steps": plan.total_steps, "run.samples_per_epoch": plan.samples_per_epoch,
                  "run.global_batch": plan.global_batch, "run.lr_factor": rates.factor, "run.lr": rates.lr,
                  "run.warmup_lr": rates.warmup_lr, "run.min_lr": rates.min_lr,
                  "run.warmup_steps": warmup_steps(config, plan.steps_per_epoch),
                  **(run_params or {})}
        run_id, resumed = start_training_run(tracker, config.tracking.experiment, config.tracking.run_name or plan.name,
                                             plan.run_key, params, dump_config(config), run_tags, resume=not fresh)
        log.info("MLflow run %s (%s) at %s", run_id, "continued" if resumed else "new", uri)
    marker_dir = plan.local_run_dir or Path(tempfile.gettempdir()) / "pgseg-faults" / plan.name
    faults = os.environ.get(FAULT_ENV)
    parse_faults(faults)  # a malformed drill fails here, not in the workers
    loop = LoopSettings(config, plan.steps_per_epoch, plan.total_steps, run_id, uri, ingest, faults,
                        str(marker_dir / ".faults"),
                        f"{plan.run_key}/{BEST_MODEL_FILE}")
    # the settings go to the workers through the object store: Ray Train's controller keeps the train_loop_config it
    # is given, and unpickling our settings there would import the whole training stack (seconds) in a process
    # that never uses it
    trainer = TorchTrainer(  # no datasets: the workers read the data pass by pass (pipelines/train/passes.py)
        train_loop_per_worker, train_loop_config={SETTINGS: ray.put(loop)},
        torch_config=torch_config(on_loopback(), t.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=(t.min_workers, t.max_workers) if t.elastic else t.workers,
                                     elastic_resize_monitor_interval_s=t.elastic_check_s,
                                     use_gpu=t.use_gpu, accelerator_type=t.accelerator_type,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(name=plan.name, storage_path=plan.storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             logging_config=LoggingConfig(log_level=train_log_level())))
    try:
        result = trainer.fit()
    except Exception as exc:
        if run_id and end_failed_run:
            tracker.end(run_id, "FAILED", {"pgseg.error": str(exc)[:5000]})
        raise TrainingError(f"training run {plan.name!r} failed: {exc}") from exc
    metrics = dict(result.metrics or {})
    step = int(metrics.get("step", 0))
    if "stopped" in metrics:
        if run_id and end_failed_run:
            tracker.end(run_id, "FAILED", {"pgseg.error": metrics["stopped"]})
        raise TrainingError(f"training run {plan.name!r} stopped: {metrics['stopped']} (train.nonfinite=stop); "
                            f"the latest checkpoint is kept")
    finished = step >= plan.total_steps
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    model_file = None
    if finished and result.checkpoint is not None:
        folder = model_dir or plan.local_run_dir or tempfile.mkdtemp(prefix="pgseg-model-")
        target = Path(folder) / MODEL_FILE
        with result.checkpoint.as_directory() as folder:
            model_file = str(export_model(folder, config, target))
    champion = None
    if run_id and config.tracking.log_models and result.best_checkpoints:
        champion = log_models(result.best_checkpoints, config, run_id, uri, register=finished)
    if run_id:
        artifacts = [model_file] if model_file and config.tracking.log_model else []
        state = "finished" if finished else f"paused at step {step} (run again with train.name={plan.name} to continue)"
        lost = {k: int(metrics.get(f"tracking/{k}", 0)) for k in ("unsent", "dropped")}
        if any(lost.values()):
            log.warning("MLflow run %s misses %d metric values that rank 0 could not send (%d dropped past its "
                        "buffer)", run_id, lost["unsent"] + lost["dropped"], lost["dropped"])
        tracker.end(run_id, "FINISHED" if finished else "KILLED",
                    {"pgseg.checkpoint": str(ckpt_path), "pgseg.step": str(step), "pgseg.state": state,
                     **{f"pgseg.metrics_{k}": str(v) for k, v in lost.items()}}, artifacts)
    return TrainResult(plan.name, step, plan.total_steps, finished, ckpt_path, model_file, run_id, metrics, champion)


def log_models(checkpoints: list, config: Any, run_id: str, uri: str, register: bool) -> str | None:
    """The kept checkpoints as LoggedModels of the run and, when ``register``, the best one as the registered model's
    champion (its ``models:/NAME@champion`` URI returned). A failure here is reported on the run and in the log;
    the training's results stay."""
    from pgseg.datasets import open_dataset
    from pipelines.models import example_input, log_kept_models, register_champion

    t = config.tracking
    try:
        kept = log_kept_models(run_id, uri, checkpoints, config, *example_input())
        if register and t.registered_model:
            metric = t.champion_metric or (f"eval/{open_dataset(config.eval.datasets[0]).name}/mIoU"
                                           if config.eval.datasets else "eval/best_mIoU")
            best, version = register_champion(kept, uri, t.registered_model, metric)
            log.info("registered %s version %s (step %d) as %s@champion", t.registered_model, version, best.step,
                     t.registered_model)
            return f"models:/{t.registered_model}@champion"
    except Exception as exc:  # noqa: BLE001 - the models are an extra: the run and its files stand without them
        log.warning("the run's models were not logged to MLflow: %s", exc)
        Tracker(uri).set_tags(run_id, {"pgseg.models_error": str(exc)[:5000]})
    return None
