"""The loop each Ray Train worker runs: restore or build the training step, then step through this worker's split
of the ingest, scoring the dev sets (rank 0) and reporting to Ray Train with a checkpoint every few steps; per-step
curves go from rank 0 to MLflow. ARCHITECTURE's "one batch, end to end" walks through it."""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from pgseg.config import Config
from pgseg.distributed import Collectives
from pgseg.train import DevEvaluation, TrainStep, load_state, save_state, set_rng_state
from pipelines.ray_private import quiet_train_reports
from pipelines.tracking import MetricLogger
from pipelines.train.faults import kill_in_backward, kill_once, parse_faults
from pipelines.train.plan import TrainingError

log = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    """What the driver sends every worker (once, with the trainer)."""

    config: Config
    steps_per_epoch: int
    total_steps: int
    run_id: str | None  # the MLflow run rank 0 logs into
    tracking_uri: str | None
    skip_counter: Any  # the ingest's counting actor (or None)
    faults: str | None
    fault_marker_dir: str
    best_model: str | None  # where rank 0 writes the best model by the first dev set


def batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int | None, device: torch.device,
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


def _ddp(model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
    return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=ddp_kwargs)


def train_loop_per_worker(loop: LoopSettings) -> None:
    """One Ray Train worker: build, restore, train, checkpoint, report."""
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
    step, in_pass, nonfinite, best = 0, 0, 0, float("-inf")
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, rng = load_state(folder, rank)
        step_fn.load_state_dict(state)
        step, in_pass, nonfinite = state["step"], state["batches_in_pass"], state["nonfinite_steps"]
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
    stream = batches(ray.train.get_dataset_shard("train"), data.batch_size, data.shuffle_buffer,
                     data.seed if t.deterministic else None, device, skip=in_pass if t.deterministic else 0)
    stop_at = min(total, t.stop_after or total)
    e = config.eval
    eval_every = e.every_steps or e.every_epochs * steps_per_epoch if e.datasets else 0
    scorer = DevEvaluation(config, loop.best_model) if rank == 0 and eval_every else None
    latest_eval: dict[str, float] = {}
    timing = {"time/data": 0.0, "time/compute": 0.0, "time/optim": 0.0}
    window_start, window_steps = time.perf_counter(), 0

    def save(metrics: dict[str, Any], at_step: int, consumed: int) -> None:
        """Report ``metrics`` with a checkpoint of the training state."""
        if metrics_log is not None:
            metrics_log.flush()
            if at_step == stop_at:
                metrics.update(metrics_log.close())
        with tempfile.TemporaryDirectory() as folder:
            save_state(folder, step_fn, {"step": at_step, "epoch": at_step // steps_per_epoch,
                                         "batches_in_pass": consumed, "nonfinite_steps": nonfinite,
                                         "best_eval": best})
            if faults.get("killsave") == (at_step, rank):
                kill_once(markers / f"killsave-{at_step}-{rank}")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"checkpoint_step{at_step:09d}")

    while step < stop_at:
        t0 = time.perf_counter()
        batch, in_pass = next(stream)
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
            log.warning("non-finite loss at step %d: %s", step, "step skipped" if t.nonfinite == "skip" else "stopping")
            if t.nonfinite == "stop":  # a checkpoint of the last good state (this step changed nothing) says why
                save({"step": step, "stopped": f"non-finite loss at step {step}", "nonfinite_steps": nonfinite},
                     step, in_pass)
                break
        step += 1
        if "kill" in faults and faults["kill"] == (step, rank):
            kill_once(markers / f"kill-{step}-{rank}")
        checkpoint_now = step % t.checkpoint_every == 0 or step % steps_per_epoch == 0 or step == stop_at
        # every checkpoint's report carries eval scores (a sweep's scheduler reads them): the first one scores
        eval_now = bool(eval_every) and (step % eval_every == 0 or step == total or (checkpoint_now and not latest_eval))
        if not (checkpoint_now or eval_now or step % config.tracking.log_every == 0):
            continue
        now = time.perf_counter()
        metrics: dict[str, Any] = {"step": step, "total_steps": total, "epoch": step / steps_per_epoch,
                                   "lr": step_fn.optimizer.param_groups[0]["lr"], **result.losses,
                                   "grad_norm": result.grad_norm, "global_batch": step_fn.global_batch,
                                   "nonfinite_steps": nonfinite,
                                   "images_per_s": window_steps * step_fn.global_batch / (now - window_start)}
        metrics.update({k: float(v) for k, v in result.metrics.items()})
        metrics.update({k: v / window_steps for k, v in timing.items()})
        if rank == 0 and loop.skip_counter is not None:
            metrics.update({f"skips/{k}": v for k, v in ray.get(loop.skip_counter.totals.remote()).items()})
        if scorer is not None and eval_now:  # the other ranks wait for rank 0 in the next gradient all-reduce
            latest_eval, best = scorer(step_fn.model, best)
            metrics.update(latest_eval)
        timing = dict.fromkeys(timing, 0.0)
        window_start, window_steps = time.perf_counter(), 0
        if metrics_log is not None:
            metrics_log.log(step, {k: v for k, v in metrics.items() if k not in ("step", "total_steps")})
        if checkpoint_now:  # Ray Train hears of metrics (and the latest eval scores, e.g. for Tune) with
            save({**latest_eval, **metrics}, step, in_pass + 1)  # checkpoints only: a report is a barrier that
            # costs about a second here, so per-step curves go to MLflow alone
    if metrics_log is not None:
        metrics_log.close()
