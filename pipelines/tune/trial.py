"""One trial of a sweep: a Tune function trainable that plans and fits one training run (``pipelines.train``) with
its metrics forwarded to Tune, named by the trial so a restored sweep continues it from its own checkpoints; and the
driver's view of the trials (Tune's parameter space, one progress line per trial event, the marks of ended trials).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.data
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import AUTO_RESULT_KEYS

from pgseg.fileio import atomic_write_json
from pipelines.train import TrainingError, fit, plan_training
from pipelines.tune.spec import SEED, SweepSpec, Variant, seed_values, trial_label

TUNE_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint"}  # Tune fills these in
ENDED_DIR = "ended"  # one mark per trial that ended (finished, stopped by the scheduler or failed)


@dataclass
class TrialSetup:
    """What every trial needs from the driver (sent once, with ``tune.with_parameters``)."""

    spec: SweepSpec
    runs: str  # the trials' Ray Train storage
    uri: str | None  # MLflow (absolute), None without tracking
    parent: str | None  # the sweep's MLflow run
    cwd: str  # the driver's folder: relative paths in the config start there

    def variant(self, params: dict[str, Any]) -> Variant:
        return self.spec.variants[params["variant"]] if self.spec.variants else Variant("default", {})

    def describe(self, params: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """(variant name, label, the swept values and, with ``seeds``, the seed) of a trial's Tune parameters."""
        name = self.variant(params).name
        values = {key: params[key] for key in self.spec.space}
        if self.spec.seeds:
            values[SEED] = params[SEED]
        return name, trial_label(name, values), values

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        """The config values of a trial: its variant's, then its point in the space, then its seed's."""
        swept = {k: v for k, v in self.describe(params)[2].items() if k != SEED}
        return {**self.variant(params).set, **swept, **seed_values(params.get(SEED) if self.spec.seeds else None)}


def for_tune(metrics: dict[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """A non-finite value of the sweep metric becomes the worst value: ASHA compares NaN with nothing, so a diverged
    trial would never be stopped."""
    value = metrics.get(metric)
    if isinstance(value, (int, float)) and not math.isfinite(value):
        return {**metrics, metric: -math.inf if mode == "max" else math.inf}
    return metrics


class TrialReport(TuneReportCallback):
    """Ray Train's reports forwarded to Tune (from the Train controller), but for the last step's: the trainable
    reports that one itself once ``fit`` has returned, so a scheduler's stop on it cannot cut the model export and
    the MLflow run's end. Reports without the sweep's metric (one scored only by the final model) stay with Train."""

    def __init__(self, metric: str, mode: str):
        super().__init__()
        self.metric, self.mode = metric, mode

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = metrics[0] if metrics else {}
        if first.get("step", 0) >= first.get("total_steps", math.inf):
            return
        if self.metric not in first:  # a set of eval.final_datasets: scored at the last step only, which the
            return  # trainable reports itself (Tune refuses a result without the sweep's metric)
        super().after_report(run_context, [for_tune(first, self.metric, self.mode), *metrics[1:]], checkpoint)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: one training run of the sweep, with its metrics forwarded to Tune."""
    if os.path.isdir(setup.cwd):
        os.chdir(setup.cwd)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver prints one line per report
    trial_id = tune.get_context().get_trial_id()
    ended = ended_result(setup.spec.root, trial_id)
    if ended is not None:  # the driver died before Tune saved this trial's end: its result, nothing trained again
        tune.report(ended)
        return
    variant, label, values = setup.describe(params)
    # a trial's models are logged with its run, none registered: the trials would take the champion alias in turn
    run = {"train.name": f"trial_{trial_id}", "train.storage_path": setup.runs,
           "tracking.run_name": f"{setup.spec.name}: {label}", "tracking.registered_model": None}
    if setup.uri:
        run["tracking.uri"] = setup.uri
    plan = plan_training(setup.spec.config({**setup.values(params), **run}))
    tags = {"pgseg.sweep": setup.spec.name, "pgseg.trial": label, "pgseg.trial_id": trial_id}
    if setup.parent:
        tags["mlflow.parentRunId"] = setup.parent
    result = fit(plan, callbacks=[TrialReport(setup.spec.metric, setup.spec.mode)], run_tags=tags,
                 run_params={"trial.variant": variant, **{f"trial.{k}": v for k, v in values.items()}},
                 end_failed_run=False)  # the sweep ends it (pipelines.tune.run._close_trial_runs)
    if not result.finished:
        raise TrainingError(f"trial {label}: training stopped at step {result.step} of {result.total_steps}")
    tune.report(for_tune(result.metrics, setup.spec.metric, setup.spec.mode))


def param_space(spec: SweepSpec) -> dict[str, Any]:
    space: dict[str, Any] = {"variant": tune.grid_search(list(range(len(spec.variants)))) if spec.variants else 0}
    if spec.seeds:
        space[SEED] = tune.grid_search(list(spec.seeds))
    for key, sampler in spec.space.items():
        kind, values = next(iter(sampler.items()))
        space[key] = {"grid": tune.grid_search, "choice": tune.choice}[kind](values) if kind in ("grid", "choice") \
            else {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*values)
    return space


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def ended_trials(root: Path) -> set[str]:
    """The ids of the trials that ended (an interrupted trial has no mark)."""
    return {p.stem for p in (root / ENDED_DIR).glob("*.json")}


def ended_result(root: str | Path, trial_id: str) -> dict[str, Any] | None:
    """The last result of a trial that ended well (None: not ended, failed, or marked without one)."""
    try:
        mark = json.loads((Path(root) / ENDED_DIR / f"{trial_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return mark.get("result") if mark.get("ended") == "ended" else None


class SweepProgress(Callback):
    """One line per trial start, report and end (the sweep's own progress, printed by the driver), and a mark per
    trial that ended."""

    def __init__(self, trial_setup: TrialSetup):
        self.trial_setup = trial_setup

    def _label(self, trial: Any) -> str:
        return f"trial {trial.trial_id} ({self.trial_setup.describe(trial.config)[1]})"

    def on_trial_start(self, iteration, trials, trial, **info):
        if ended_result(self.trial_setup.spec.root, trial.trial_id) is not None:
            print(f"[sweep] {self._label(trial)} had ended: its result, not run again", flush=True)
        else:
            print(f"[sweep] {self._label(trial)} started", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metric = self.trial_setup.spec.metric
        value = result.get(metric)
        if isinstance(value, (int, float)):
            print(f"[sweep] {self._label(trial)} step {result.get('step')}/{result.get('total_steps')}: "
                  f"{metric} {value:.4f}", flush=True)

    def _ended(self, trial: Any, how: str) -> None:
        """The mark (with the last result's values) comes first: a driver killed after it still knows the end."""
        result = {k: v for k, v in (trial.last_result or {}).items()  # the trial's own metrics, not Tune's keys
                  if k not in TUNE_KEYS and isinstance(v, (int, float, str, bool))
                  and not (isinstance(v, float) and not math.isfinite(v))}
        atomic_write_json(Path(self.trial_setup.spec.root) / ENDED_DIR / f"{trial.trial_id}.json",
                          {"ended": how, "result": result})
        print(f"[sweep] {self._label(trial)} {how}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, "ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "failed")
