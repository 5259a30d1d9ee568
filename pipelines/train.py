"""Distributed PGSeg training on Ray Train V2: one ``TorchTrainer``, the ingest's Ray dataset split per worker,
DDP (gloo on CPU, NCCL on GPU), autocast, AdamW + per-step warm-up/cosine, checkpoints through ``ray.train.report``,
resume by run name, worker restarts from the latest checkpoint, metrics from rank 0 into one MLflow run.

The driver side (:func:`plan_training`, :func:`fit`) checks everything it can before Ray starts; the worker side
(:func:`train_loop_per_worker`) is the loop of ARCHITECTURE's "one batch, end to end".
"""
from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from pgseg.config import Config, ConfigError, dump_config, flatten, load_config, to_dict
from pgseg.distributed import all_gather_with_grad, all_reduce_mean

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # model, optimiser, scheduler, scaler, step, data position (rank 0)
RANK_FILE = "rank{rank}.pt"  # each rank's RNG streams and digests of its parameters and prototype buffers
MODEL_FILE = "model.safetensors"  # the final model, in our format (pgseg.checkpoint.load_model reads it)
BEST_MODEL_FILE = "model_best.safetensors"  # the model with the best eval.datasets[0] mIoU during training
DATA_CPUS = 1.0  # CPUs left to Ray Data's read/decode tasks on a machine that also trains
FAULT_ENV = "PGSEG_FAULT_INJECT"  # drills: "kill@STEP[:RANK]" (SIGKILL once per run), "nan@STEP" (a NaN loss)


class TrainingError(RuntimeError):
    """The run could not finish: the message names the step and the cause."""


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Everything the driver resolves before Ray starts: the config, the run's identity and its step counts."""

    config: Config
    name: str
    storage_path: str  # absolute local folder or a URI (s3://, gs://)
    samples_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    shards: list[list[str]] = field(default_factory=list)

    @property
    def run_key(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def local_run_dir(self) -> Path | None:
        return None if "://" in self.storage_path else Path(self.storage_path) / self.name


def _is_uri(path: str) -> bool:
    return "://" in path


def check_resources(config: Config, cpus: float, gpus: float = 0.0) -> None:
    """Fail, naming the keys, when the workers cannot all be placed with a CPU left for Ray Data."""
    t = config.train
    need = t.workers * t.cpus_per_worker
    if need + DATA_CPUS > cpus + 1e-9:
        raise ConfigError(f"train.workers: {t.workers} worker(s) × train.cpus_per_worker {t.cpus_per_worker} CPU "
                          f"= {need:g} CPUs, plus {DATA_CPUS:g} for Ray Data, but the cluster has {cpus:g} CPUs; "
                          f"lower train.workers or train.cpus_per_worker")
    if t.use_gpu and t.workers > gpus:
        raise ConfigError(f"train.use_gpu: {t.workers} worker(s) need {t.workers} GPUs, the cluster has {gpus:g}")


def plan_training(config: Config, *, samples_per_epoch: int | None = None) -> Plan:
    """Resolve the run: shards, samples and steps per epoch, name, storage. Raises ConfigError naming the key."""
    from pipelines.ingest import manifest_samples, shard_list

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
    if t.init_from is not None and not _is_uri(t.init_from) and not Path(t.init_from).is_file():
        raise ConfigError(f"train.init_from: {t.init_from} is not a file (the official recipe starts from GroupViT's "
                          f"released checkpoint; give its path)")
    samples = samples_per_epoch or data.samples_per_epoch or manifest_samples(data.shards)
    if not samples:
        raise ConfigError("data.samples_per_epoch: the shards have no manifest to count them; set it")
    global_batch = data.batch_size * t.workers
    steps_per_epoch = samples // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"data.batch_size: one global batch ({data.batch_size} × {t.workers} workers = "
                          f"{global_batch}) is larger than an epoch ({samples} samples)")
    name = t.name or time.strftime("pgseg-%Y%m%d-%H%M%S")
    storage = t.storage_path if _is_uri(t.storage_path) else str(Path(t.storage_path).resolve())
    from pgseg.datasets import open_dataset

    for i, spec in enumerate(config.eval.datasets):  # scored during training: readable before any worker starts
        try:
            open_dataset(spec)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"eval.datasets[{i}]: {exc}") from None
    return Plan(config, name, storage, samples, steps_per_epoch, steps_per_epoch * config.schedule.epochs, shards)


# ------------------------------------------------------------------------------------- optimiser and schedule
def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of SPEC §4: no weight decay on 1-D (and 0-D) parameters and on biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    o = config.optim
    return torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int):
    """timm's cosine schedule, per step: linear warm-up from ``warmup_lr``, cosine to ``min_lr`` counted from step 0
    (the released recipe's timing)."""
    from timm.scheduler import CosineLRScheduler

    s = config.schedule
    return CosineLRScheduler(optimizer, t_initial=s.epochs * steps_per_epoch, lr_min=s.min_lr,
                             warmup_t=round(s.warmup_epochs * steps_per_epoch), warmup_lr_init=s.warmup_lr,
                             t_in_epochs=False)


def learning_rate(config: Config, steps_per_epoch: int, step: int) -> float:
    """The learning rate the schedule gives at ``step`` (for reports and tests)."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.optim.lr)
    scheduler = build_scheduler(probe, config, steps_per_epoch)
    scheduler.step_update(step)
    return probe.param_groups[0]["lr"]


# ------------------------------------------------------------------------------------------------ faults
def parse_faults(spec: str | None) -> dict[str, tuple[int, int]]:
    """``kill@5:1,nan@3`` → {"kill": (5, 1), "nan": (3, 0)} (step, rank)."""
    faults: dict[str, tuple[int, int]] = {}
    for item in filter(None, (spec or "").split(",")):
        kind, _, rest = item.strip().partition("@")
        step, _, rank = rest.partition(":")
        if kind not in ("kill", "nan") or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected kill@STEP[:RANK] or nan@STEP, comma-separated")
        faults[kind] = (int(step), int(rank or 0))
    return faults


def _kill_once(marker: Path) -> None:
    """SIGKILL this process, once per marker: the drill of a lost worker."""
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("killed\n")
    log.warning("fault drill: SIGKILL of this worker (pid %d)", os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------- the worker loop
def _batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int | None, device: torch.device,
             skip: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Endless batches from this worker's split: pass after pass (every worker's passes have the same length, so
    the ranks start their passes together). Yields (batch, index of the batch in its pass)."""
    passes = 0
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                              local_shuffle_buffer_size=shuffle_buffer or None,
                                              local_shuffle_seed=None if seed is None else seed + passes):
            n += 1
            if n <= skip:
                continue
            yield batch, n - 1
        if n == 0:
            raise TrainingError(f"this worker's data split holds no complete batch of {batch_size}: "
                                f"lower data.batch_size or add data")
        skip, passes = 0, passes + 1


def _load_state(checkpoint: Any, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        rank_path = Path(folder) / RANK_FILE.format(rank=rank)
        own = torch.load(rank_path, map_location="cpu", weights_only=True) if rank_path.is_file() else None
    return state, (own or {}).get("rng")


def state_digests(model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of the parameters and of the prototype buffers (``mu``): equal digests = bitwise-equal replicas."""
    import hashlib

    digests = {"parameters": hashlib.sha256(), "prototypes": hashlib.sha256()}
    parameters = {name for name, _ in model.named_parameters()}
    for name, tensor in model.state_dict().items():
        kind = "prototypes" if name.endswith(".mu") else "parameters" if name in parameters else None
        if kind:
            digests[kind].update(name.encode())
            digests[kind].update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {k: v.hexdigest() for k, v in digests.items()}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class StepResult:
    losses: dict[str, float]  # "loss" and each "loss/<term>", averaged over ranks
    metrics: dict[str, torch.Tensor]  # the model's detached scalars (this rank)
    grad_norm: float
    finite: bool
    seconds: dict[str, float]  # "time/compute" (forward + backward), "time/optim"


class Stepper:
    """One rank's model, optimiser, schedule and scaler, and the training step: plain PyTorch, no Ray (the Ray
    Train loop and the benchmarks' plain-process loop run this same step). ``wrap`` wraps the model for DDP."""

    def __init__(self, config: Config, steps_per_epoch: int, device: torch.device, *, rank: int = 0,
                 world: int = 1, init: bool = True, wrap: Any = None):
        from pgseg.checkpoint import init_from_checkpoint
        from pgseg.model import PGSeg

        self.config, self.steps_per_epoch, self.device, self.rank, self.world = config, steps_per_epoch, device, rank, world
        t = config.train
        torch.manual_seed(t.seed)  # the same initial model on every rank (DDP also broadcasts rank 0's)
        model = PGSeg.from_config(config)
        if init and t.init_from:
            report = init_from_checkpoint(model, t.init_from)
            if rank == 0:
                log.info("initialised from %s:\n%s", t.init_from, report.text())
        if t.use_gpu and world > 1:  # batch statistics of the projectors over the global batch (CUDA only)
            model.sync_batchnorm()
        self.model = model.to(device)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        torch.manual_seed(t.seed * 1000 + rank)  # Gumbel noise and dropout differ across ranks
        npr = config.npr.resolved()
        delayed = npr.enabled and (npr.start_epoch > 0 or npr.start_step > 0)  # the graph grows when NPR starts
        self.net = wrap(self.model, find_unused_parameters=delayed) if wrap else self.model
        self.global_batch = 0

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        out = all_gather_with_grad(x)
        if not self.global_batch:  # the first gather of a step is the image-text loss's: what it compared against
            self.global_batch = out.shape[0]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def __call__(self, batch: dict[str, torch.Tensor], step: int, *, poison: bool = False) -> StepResult:
        """Forward, backward, a finite check agreed by all ranks, clip, optimiser step, prototype EMA."""
        t0 = time.perf_counter()
        self.net.train()
        self.global_batch = 0
        self.scheduler.step_update(step)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.net(batch["image"], batch["tokens"], noun_tokens=batch.get("nouns"), step=step,
                           epoch=step // self.steps_per_epoch, gather=self._gather, rank=self.rank,
                           mean=all_reduce_mean)
        loss = out.loss * float("nan") if poison else out.loss
        self.scaler.scale(loss).backward()
        t1 = time.perf_counter()
        losses = all_reduce_mean(torch.stack([loss.detach().float(), *(v.float() for v in out.terms.values())]))
        finite = bool(torch.isfinite(losses[0]))  # the same on every rank: the mean over ranks
        grad_norm = float("nan")
        if finite:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip or math.inf))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.model.ema_step(out.prototypes, all_reduce_mean)
        self.optimizer.zero_grad(set_to_none=True)
        values = losses.tolist()
        return StepResult({"loss": values[0], **{f"loss/{k}": v for k, v in zip(out.terms, values[1:])}},
                          out.metrics, grad_norm, finite,
                          {"time/compute": t1 - t0, "time/optim": time.perf_counter() - t1})


def _quiet_reports() -> None:
    """No log line per report and checkpoint from the workers (Ray Train names one of these loggers by its file
    path, out of reach of its LoggingConfig)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: build, restore, train, checkpoint, report."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from pipelines.tracking import MetricLogger

    _quiet_reports()
    config = load_config(loop["config"])
    t, data = config.train, config.data
    steps_per_epoch, total = loop["steps_per_epoch"], loop["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    checkpoint = ray.train.get_checkpoint()

    def wrap(model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=ddp_kwargs)

    stepper = Stepper(config, steps_per_epoch, device, rank=rank, world=world, init=checkpoint is None, wrap=wrap)
    step, in_pass, nonfinite, best = 0, 0, 0, float("-inf")
    if checkpoint is not None:
        state, rng = _load_state(checkpoint, rank)
        stepper.load_state_dict(state)
        step, in_pass, nonfinite = state["step"], state["batches_in_pass"], state["nonfinite_steps"]
        best = state.get("best_eval", best)
        if rng is not None and state["world_size"] == world:
            _set_rng_state(rng)
        if rank == 0:
            log.info("resumed at step %d of %d", step, total)
    faults = parse_faults(loop.get("faults"))
    metrics_log = MetricLogger(loop["tracking_uri"], loop["run_id"], config.tracking.log_every) \
        if rank == 0 and loop.get("run_id") else None
    counter = loop.get("skip_counter")
    batches = _batches(ray.train.get_dataset_shard("train"), data.batch_size, data.shuffle_buffer,
                       data.seed if t.deterministic else None, device, skip=in_pass if t.deterministic else 0)
    stop_at = min(total, t.stop_after or total)
    e = config.eval
    eval_every = e.every_steps or e.every_epochs * steps_per_epoch if e.datasets else 0
    scorer = TrainingEval(config, loop.get("best_model")) if rank == 0 and eval_every else None
    latest_eval: dict[str, float] = {}
    timing = {"time/data": 0.0, "time/compute": 0.0, "time/optim": 0.0}
    window_start, window_steps = time.perf_counter(), 0

    def save(metrics: dict[str, Any], at_step: int, consumed: int) -> None:
        """Report ``metrics`` with a checkpoint: rank 0 writes the training state, every rank its RNG and digests."""
        if metrics_log is not None:
            metrics_log.flush()
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save({**stepper.state_dict(), "step": at_step, "epoch": at_step // steps_per_epoch,
                            "batches_in_pass": consumed, "nonfinite_steps": nonfinite, "world_size": world,
                            "best_eval": best,
                            "config": dump_config(config)}, Path(folder) / STATE_FILE)
            torch.save({"rng": _rng_state(), "digests": state_digests(stepper.model)},
                       Path(folder) / RANK_FILE.format(rank=rank))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"checkpoint_step{at_step:09d}")

    while step < stop_at:
        t0 = time.perf_counter()
        batch, in_pass = next(batches)
        timing["time/data"] += time.perf_counter() - t0
        result = stepper(batch, step, poison=faults.get("nan", (-1,))[0] == step)
        for key, value in result.seconds.items():
            timing[key] += value
        window_steps += 1
        if not result.finite:
            nonfinite += 1
            log.warning("non-finite loss at step %d: %s", step, "step skipped" if t.nonfinite == "skip" else "stopping")
            if t.nonfinite == "stop":  # a checkpoint of the last good state (this step changed nothing) says why
                save({"step": step, "stopped": f"non-finite loss at step {step}", "nonfinite_steps": nonfinite},
                     step, in_pass)
                break
        step += 1
        if "kill" in faults and faults["kill"] == (step, rank):
            _kill_once(Path(loop["fault_marker_dir"]) / f"kill-{step}-{rank}")
        checkpoint_now = step % t.checkpoint_every == 0 or step % steps_per_epoch == 0 or step == stop_at
        # every checkpoint's report carries eval scores (a sweep's scheduler reads them): the first one scores
        eval_now = bool(eval_every) and (step % eval_every == 0 or step == total or (checkpoint_now and not latest_eval))
        if not (checkpoint_now or eval_now or step % config.tracking.log_every == 0):
            continue
        now = time.perf_counter()
        metrics: dict[str, Any] = {"step": step, "total_steps": total, "epoch": step / steps_per_epoch,
                                   "lr": stepper.optimizer.param_groups[0]["lr"], **result.losses,
                                   "grad_norm": result.grad_norm, "global_batch": stepper.global_batch,
                                   "nonfinite_steps": nonfinite,
                                   "images_per_s": window_steps * data.batch_size * world / (now - window_start)}
        metrics.update({k: float(v) for k, v in result.metrics.items()})
        metrics.update({k: v / window_steps for k, v in timing.items()})
        if rank == 0 and counter is not None:
            metrics.update({f"skips/{k}": v for k, v in ray.get(counter.totals.remote()).items()})
        if scorer is not None and eval_now:  # the other ranks wait for rank 0 in the next gradient all-reduce
            latest_eval, best = scorer(stepper.model, best)
            metrics.update(latest_eval)
        timing = dict.fromkeys(timing, 0.0)
        window_start, window_steps = time.perf_counter(), 0
        if metrics_log is not None:
            metrics_log.log(step, {k: v for k, v in metrics.items() if k not in ("step", "total_steps")})
        if checkpoint_now:  # Ray Train hears of metrics (and the latest eval scores, e.g. for Tune) with
            save({**latest_eval, **metrics}, step, in_pass + 1)  # checkpoints only: a report is a barrier that
            # costs about a second here, so per-step curves go to MLflow alone
    if metrics_log is not None:
        metrics_log.flush()


class TrainingEval:
    """Evaluation during training (rank 0, in process): zero-shot mIoU of a copy of the model on each of
    ``eval.datasets``; when the first one's mIoU beats the best so far, the model is written to ``best_path``."""

    def __init__(self, config: Config, best_path: str | None):
        from pgseg.datasets import open_dataset
        from pgseg.segment import ProtocolSettings, background_threshold

        e = config.eval
        self.config, self.best_path = config, best_path
        self.datasets = [open_dataset(spec) for spec in e.datasets]
        self.settings = [ProtocolSettings.of(e, background_threshold(None, e, d.bg_thresh)) for d in self.datasets]

    def __call__(self, model: torch.nn.Module, best: float) -> tuple[dict[str, float], float]:
        import copy

        from pgseg.checkpoint import save_model
        from pipelines.evaluate import evaluate_in_process

        frozen = copy.deepcopy(model).eval()  # nothing of the training model changes (buffers included)
        out: dict[str, float] = {}
        with torch.no_grad():
            for i, (dataset, settings) in enumerate(zip(self.datasets, self.settings)):
                scores, baseline = evaluate_in_process(frozen, dataset, settings)
                out[f"eval/{dataset.name}/mIoU"] = scores.miou
                if i == 0:
                    out["eval/best_mIoU"] = max(best, scores.miou)
                    if scores.miou > best:
                        best = scores.miou
                        if self.best_path:
                            save_model(frozen, self.config, self.best_path)
        return out, best


# ------------------------------------------------------------------------------------------------ the driver
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


def export_model(checkpoint: Any, config: Config, path: Path) -> Path:
    """The model of a training checkpoint as one of our ``.safetensors`` model files."""
    from pgseg.checkpoint import save_model
    from pgseg.model import PGSeg

    state, _ = _load_state(checkpoint, 0)
    model = PGSeg.from_config(config)
    model.load_state_dict(state["model"])
    return save_model(model, config, path)


def fit(plan: Plan, *, dataset: Any = None, callbacks: list[Any] = (), run_tags: dict[str, str] | None = None,
        run_params: dict[str, Any] | None = None) -> TrainResult:
    """Train on the attached Ray cluster. ``dataset`` replaces the ingest of ``data.shards`` (a Ray dataset with
    ``image`` [3, S, S] float32 and ``tokens`` int64 columns); ``callbacks`` are Ray Train callbacks (a sweep's
    ``TuneReportCallback``); ``run_tags`` and ``run_params`` go on a new MLflow run besides the config."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ingest import Ingest
    from pipelines.rendezvous import torch_config
    from pipelines.runtime import on_loopback, train_log_level
    from pipelines.tracking import resolve_uri, finish_training_run, start_training_run

    config, t = plan.config, plan.config.train
    resources = ray.cluster_resources()
    check_resources(config, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
    counter = None
    if dataset is None:
        ingest = Ingest(plan.shards, config.data.img_size, config.model.text.context_length, config.data.min_scale,
                        config.data.weights, config.data.seed, train=config.data.augment,
                        multi_label=config.loss.multi_label, noun_vocabulary=config.loss.noun_vocabulary,
                        deterministic=t.deterministic)
        dataset, counter = ingest.dataset(0), ingest.counter
    uri = resolve_uri(config.tracking.uri)
    run_id = None
    if config.tracking.enabled:
        params = {**flatten(to_dict(config)), "run.name": plan.name, "run.steps_per_epoch": plan.steps_per_epoch,
                  "run.total_steps": plan.total_steps, "run.samples_per_epoch": plan.samples_per_epoch,
                  **(run_params or {})}
        run_id, resumed = start_training_run(uri, config.tracking.experiment, config.tracking.run_name or plan.name,
                                             plan.run_key, params, dump_config(config), run_tags)
        log.info("MLflow run %s (%s) at %s", run_id, "continued" if resumed else "new", uri)
    marker_dir = plan.local_run_dir or Path(tempfile.gettempdir()) / "pgseg-faults" / plan.name
    loop = {"config": to_dict(config), "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
            "run_id": run_id, "tracking_uri": uri, "skip_counter": counter, "faults": os.environ.get(FAULT_ENV),
            "fault_marker_dir": str(marker_dir / ".faults"),
            "best_model": str(plan.local_run_dir / BEST_MODEL_FILE) if plan.local_run_dir else None}
    parse_faults(loop["faults"])  # a malformed drill fails here, not in the workers
    data_config = None
    if t.deterministic:
        from ray.data import ExecutionOptions

        data_config = ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True))
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop, datasets={"train": dataset},
        torch_config=torch_config(on_loopback()),
        **({"dataset_config": data_config} if data_config is not None else {}),
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, accelerator_type=t.accelerator_type,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(name=plan.name, storage_path=plan.storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             logging_config=LoggingConfig(log_level=train_log_level())))
    try:
        result = trainer.fit()
    except Exception as exc:
        if run_id:
            finish_training_run(uri, run_id, "FAILED", {"pgseg.error": str(exc)[:5000]})
        raise TrainingError(f"training run {plan.name!r} failed: {exc}") from exc
    metrics = dict(result.metrics or {})
    step = int(metrics.get("step", 0))
    if "stopped" in metrics:
        if run_id:
            finish_training_run(uri, run_id, "FAILED", {"pgseg.error": metrics["stopped"]})
        raise TrainingError(f"training run {plan.name!r} stopped: {metrics['stopped']} (train.nonfinite=stop); "
                            f"the latest checkpoint is kept")
    finished = step >= plan.total_steps
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    model_file = None
    if finished and result.checkpoint is not None:
        target = (plan.local_run_dir or Path(tempfile.mkdtemp(prefix="pgseg-model-"))) / MODEL_FILE
        model_file = str(export_model(result.checkpoint, config, target))
    if run_id:
        artifacts = [model_file] if model_file and config.tracking.log_model else []
        state = "finished" if finished else f"paused at step {step} (run again with train.name={plan.name} to continue)"
        finish_training_run(uri, run_id, "FINISHED" if finished else "KILLED",
                            {"pgseg.checkpoint": str(ckpt_path), "pgseg.step": str(step), "pgseg.state": state},
                            artifacts)
    return TrainResult(plan.name, step, plan.total_steps, finished, ckpt_path, model_file, run_id, metrics)
