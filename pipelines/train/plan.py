"""The driver's plan of a training run: everything resolved and checked before Ray starts (shards, samples and
steps per epoch, the run's name and storage, the evaluation sets), each problem a ConfigError naming the key."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pgseg.config import Config, ConfigError
from pgseg.datasets import open_dataset
from pipelines.data.ingest import manifest_samples, shard_list
from pipelines.storage import is_uri


class TrainingError(RuntimeError):
    """The run could not finish: the message names the step and the cause."""


@dataclass
class Plan:
    config: Config
    name: str
    storage_path: str  # absolute local folder or a URI (s3://, gs://)
    samples_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    shards: list[list[str]] = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        return self.config.global_batch

    @property
    def run_key(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def local_run_dir(self) -> Path | None:
        return None if is_uri(self.storage_path) else Path(self.storage_path) / self.name


def plan_training(config: Config, *, samples_per_epoch: int | None = None) -> Plan:
    """Resolve the run: shards, samples and steps per epoch, name, storage. Raises ConfigError naming the key."""
    config.validate()
    data, t = config.data, config.train
    if not data.shards:
        raise ConfigError("data.shards: no training data given (webdataset tars, globs, shard folders or manifests)")
    try:
        shards = [shard_list([s]) for s in data.shards]
    except FileNotFoundError as exc:
        raise ConfigError(f"data.shards: {exc}") from None
    if data.img_size != config.model.image.img_size:
        raise ConfigError(f"data.img_size: {data.img_size} differs from model.image.img_size "
                          f"{config.model.image.img_size}")
    if t.init_from is not None and not is_uri(t.init_from) and not Path(t.init_from).is_file():
        raise ConfigError(f"train.init_from: {t.init_from} is not a file (the official recipe starts from GroupViT's "
                          f"released checkpoint; give its path)")
    samples = samples_per_epoch or data.samples_per_epoch or manifest_samples(data.shards)
    if not samples:
        raise ConfigError("data.samples_per_epoch: the shards have no manifest to count them; set it")
    steps_per_epoch = samples // config.global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"data.batch_size: one global batch ({data.batch_size} × {t.max_workers} workers = "
                          f"{config.global_batch}) is larger than an epoch ({samples} samples)")
    name = t.name or time.strftime("pgseg-%Y%m%d-%H%M%S")
    storage = t.storage_path if is_uri(t.storage_path) else str(Path(t.storage_path).resolve())
    for key in ("datasets", "final_datasets"):  # scored during training: readable before any worker starts
        for i, spec in enumerate(getattr(config.eval, key)):
            try:
                open_dataset(spec)
            except (ValueError, FileNotFoundError) as exc:
                raise ConfigError(f"eval.{key}[{i}]: {exc}") from None
    return Plan(config, name, storage, samples, steps_per_epoch, steps_per_epoch * config.schedule.epochs, shards)
