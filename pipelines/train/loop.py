"""The loop each Ray Train worker runs: restore or build the training step, then step through this worker's part
of each pass over the data, scoring its share of the dev sets and reporting to Ray Train with a checkpoint every few
steps; per-step curves go from rank 0 to MLflow. ARCHITECTURE's "one batch, end to end" walks through it."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.data import ExecutionResources
from ray.train import Checkpoint, CheckpointUploadMode

from pgseg.config import Config
from pgseg.distributed import Collectives
from pgseg.train import DevEvaluation, TrainStep, load_state, save_state, set_rng_state
from pipelines.ray_private import quiet_train_reports
from pipelines.data.ingest import Ingest
from pipelines.tracking import MetricLogger
from pipelines.train.faults import kill_in_backward, kill_once, parse_faults
from pipelines.train.passes import pass_batches
from pipelines.train.storage import put_file, upload_mode

log = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    """What the driver sends every worker (once, with the trainer)."""

    config: Config
    steps_per_epoch: int
    total_steps: int
    run_id: str | None  # the MLflow run rank 0 logs into
    tracking_uri: str | None
    ingest: Ingest  # the training data, read pass by pass
    faults: str | None
    fault_marker_dir: str
    best_model: str  # where rank 0 puts the best model by the first dev set (the run's storage: a path or a URI)


def _ddp(model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
    return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=ddp_kwargs)


SETTINGS = "settings"  # the train_loop_config key of the object-store reference to the LoopSettings


def train_loop_per_worker(train_loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build, restore, train, checkpoint, report."""
    loop: LoopSettings = ray.get(train_loop_config[SETTINGS])
    quiet_train_reports()
    config = loop.config
    t, data = config.train, config.data
    steps_per_epoch, total = loop.steps_per_epoch, loop.total_steps
    ctx = ray.train.get_context()
    world = Collectives(ctx.get_world_rank(), ctx.get_world_size())
    rank = world.rank
    device = ray.train.torch.get_device()
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    checkpoint = ray.train.get_checkpoint()
    step_fn = TrainStep(config, steps_per_epoch, device, world=world, init=checkpoint is None, wrap=_ddp)
    step, position, nonfinite, best = 0, (0, 0), 0, float("-inf")
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, rng = load_state(folder, rank)
        step_fn.load_state_dict(state)
        step, nonfinite = state["step"], state["nonfinite_steps"]
        position = (state.get("data_pass", 0), state["batches_in_pass"])
        best = state.get("best_eval", best)
        if rng is not None and state["world_size"] == world.world:
            set_rng_state(rng)
        if rank == 0:
            log.info("resumed at step %d of %d", step, total)
    faults = parse_faults(loop.faults)
    markers = Path(loop.fault_marker_dir)
    metrics_log = MetricLogger(loop.tracking_uri, loop.run_id, config.tracking.log_every) \
        if rank == 0 and loop.run_id else None
    if metrics_log is not None and checkpoint is not None:
        metrics_log.event("resumed_from_step", step, step)  # one value per restart, whatever the floor
    # deterministic: the interrupted pass again in the same order, its done batches skipped; otherwise that pass
    # again from its start, in a new order (each of its samples comes at least once)
    held = ExecutionResources(cpu=world.world * t.cpus_per_worker, gpu=world.world if t.use_gpu else 0)  # by workers
    # (an elastic run's global batch stays the same at any world size: each rank takes its share of it, and the data
    # position counts global batches, so a run resumed with other workers goes on where the pass stood)
    stream = pass_batches(loop.ingest, world, held, config.rank_batch(world.world), data.shuffle_buffer,
                          data.seed if t.deterministic else None, device, start_pass=position[0],
                          skip=position[1] if t.deterministic else 0)
    stop_at = min(total, t.stop_after or total)
    e = config.eval
    eval_every = e.every_steps or e.every_epochs * steps_per_epoch if e.datasets else 0
    best_dir = tempfile.TemporaryDirectory(prefix="pgseg-best-") if rank == 0 and eval_every else None
    best_file = Path(best_dir.name) / "model_best.safetensors" if best_dir else None  # then put into the storage
    scorer = DevEvaluation(config, str(best_file) if best_file else None, world) \
        if eval_every or e.final_datasets else None
    latest_eval: dict[str, float] = {}
    timing = {"time/data": 0.0, "time/compute": 0.0, "time/optim": 0.0}
    window_start, window_steps = time.perf_counter(), 0

    upload = upload_mode(t.checkpoint_upload, t.storage_path)
    saving = {"seconds": 0.0}  # how long the last checkpoint held the step loop (logged as time/checkpoint)

    def save(metrics: dict[str, Any], at_step: int, at: tuple[int, int]) -> None:
        """Report ``metrics`` with a checkpoint of the training state (written to a folder of its own; an
        asynchronous upload deletes it once stored, a synchronous one here)."""
        started = time.perf_counter()
        if metrics_log is not None:
            metrics_log.flush()
            if at_step == stop_at:
                metrics.update(metrics_log.close())
        folder = tempfile.mkdtemp(prefix="pgseg-checkpoint-")
        try:  # (on an error the folder goes; an asynchronous upload deletes it itself once stored)
            save_state(folder, step_fn, {"step": at_step, "epoch": at_step // steps_per_epoch,
                                         "data_pass": at[0], "batches_in_pass": at[1],
                                         "nonfinite_steps": nonfinite,
                                         "best_eval": best})
            if faults.get("killsave") == (at_step, rank):
                kill_once(markers / f"killsave-{at_step}-{rank}")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"checkpoint_step{at_step:09d}", checkpoint_upload_mode=upload,
                             delete_local_checkpoint_after_upload=True)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if upload != CheckpointUploadMode.ASYNC:
            shutil.rmtree(folder, ignore_errors=True)
        saving["seconds"] = time.perf_counter() - started

    try:
        while step < stop_at:
            t0 = time.perf_counter()
            before = position  # where the data stands without this batch
            batch, position = next(stream)
            timing["time/data"] += time.perf_counter() - t0
            armed = kill_in_backward(step_fn.model, markers / f"killmid-{step + 1}-{rank}") \
                if faults.get("killmid") == (step + 1, rank) else None
            result = step_fn(batch, step, poison=faults.get("nan") == (step, rank))
            if armed is not None:
                armed.remove()
            for key, value in result.seconds.items():
                timing[key] += value
            window_steps += 1
            if not result.finite:
                nonfinite += 1
                log.warning("non-finite loss at step %d: %s", step,
                            "step skipped" if t.nonfinite == "skip" else "stopping")
                if t.nonfinite == "stop":  # a checkpoint of the last good state (this step changed nothing) says why
                    save({"step": step, "stopped": f"non-finite loss at step {step}", "nonfinite_steps": nonfinite},
                         step, before)
                    break
            step += 1
            if "kill" in faults and faults["kill"] == (step, rank):
                kill_once(markers / f"kill-{step}-{rank}")
            checkpoint_now = step % t.checkpoint_every == 0 or step % steps_per_epoch == 0 or step == stop_at
            # every checkpoint's report carries eval scores (a sweep's scheduler reads them): the first one scores
            eval_now = step == total and bool(e.final_datasets) or bool(eval_every) and (
                step % eval_every == 0 or step == total or (checkpoint_now and not latest_eval))
            if not (checkpoint_now or eval_now or step % config.tracking.log_every == 0):
                continue
            now = time.perf_counter()
            metrics: dict[str, Any] = {"step": step, "total_steps": total, "epoch": step / steps_per_epoch,
                                       "lr": step_fn.optimizer.param_groups[0]["lr"], **result.losses,
                                       "grad_norm": result.grad_norm, "global_batch": step_fn.global_batch,
                                       "workers": world.world,
                                       "nonfinite_steps": nonfinite,
                                       "images_per_s": window_steps * step_fn.global_batch / (now - window_start)}
            metrics.update({k: float(v) for k, v in result.metrics.items()})
            metrics.update({k: v / window_steps for k, v in timing.items()})
            metrics["time/checkpoint"] = saving["seconds"]
            if rank == 0:
                metrics.update({f"skips/{k}": v for k, v in loop.ingest.skips().items()})
            if scorer is not None and eval_now:  # every rank scores its share: none waits long in a collective
                started = time.perf_counter()
                before_eval = best
                latest_eval, best = scorer(step_fn.model, best, final=step == total, step=step)
                if best_file is not None and best > before_eval:  # a new best: into the run's storage, for every node
                    put_file(best_file, loop.best_model)
                metrics.update(latest_eval)
                metrics["time/eval"] = time.perf_counter() - started
            timing = dict.fromkeys(timing, 0.0)
            window_start, window_steps = time.perf_counter(), 0
            if metrics_log is not None:
                metrics_log.log(step, {k: v for k, v in metrics.items() if k not in ("step", "total_steps")})
            if checkpoint_now:  # Ray Train hears of metrics (and the latest eval scores, e.g. for Tune) with
                save({**latest_eval, **metrics}, step, position)  # checkpoints only: a report is a barrier that
                # costs about a second here, so per-step curves go to MLflow alone
        if metrics_log is not None:
            metrics_log.close()
    finally:
        if best_dir is not None:  # the best model is in the run's storage by now
            best_dir.cleanup()
