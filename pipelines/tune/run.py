"""The sweep driver: every trial planned (data and eval sets there) before one starts, the sweep's state digest
(a resumed sweep must be the same sweep), Tune's ``Tuner`` (or ``Tuner.restore``) with as many trials at once as the
cluster fits, then the rows, the summary (JSON, Markdown, plots) and the sweep's MLflow run: one parent run per
sweep, one child run per trial."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from pgseg.config import ConfigError, to_dict
from pgseg.datasets import open_dataset
from pgseg.fileio import atomic_write_bytes, atomic_write_json
from pipelines.digest import value_digest
from pipelines.runtime import cluster_resources, concurrent_trials
from pipelines.tracking import Tracker
from pipelines.train import plan_training
from pipelines.tune.report import TrialRow, markdown, plot_metric, summary_table, trial_rows
from pipelines.tune.spec import SweepSpec, check_metric
from pipelines.tune.stats import plot_statistics, seed_statistics, verdict
from pipelines.tune.trial import SweepProgress, TrialSetup, ended_trials, param_space, run_trial, trial_dirname

SWEEP_KEY_TAG = "pgseg.sweep_key"
STATE_FILE = "sweep.json"  # the sweep file and base config a sweep folder was started with
TUNE_DIR = "tune"  # Tune's experiment state (Tuner.restore reads it)
RUNS_DIR = "runs"  # the trials' Ray Train runs (checkpoints, model files)


class SweepInterrupted(RuntimeError):
    """The sweep was stopped before every trial ended; its state is saved and the same command resumes it."""


@dataclass
class SweepResult:
    name: str
    root: Path
    rows: list[TrialRow]
    table: list[dict[str, Any]]
    markdown: str
    run_id: str | None  # the sweep's MLflow run
    best: TrialRow | None
    statistics: list[dict[str, Any]] | None = None  # with seeds: per variant over the seeds (pipelines.tune.stats)
    verdicts: list[str] | None = None  # each variant against the baseline, with its interval

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.rows)


def _state(spec: SweepSpec, trial_configs: list[dict[str, Any]]) -> dict[str, Any]:
    keep = ("name", "metric", "mode", "samples", "seeds", "scheduler", "space", "variants", "baseline", "asha")
    raw = {**to_dict(spec), "variants": [to_dict(v) for v in spec.variants]}
    return {"sweep": {k: raw[k] for k in keep}, "trials": trial_configs}


def _start_parent(tracker: Tracker, spec: SweepSpec, experiment: str, state: dict[str, Any], resume: bool) -> str:
    """The sweep's MLflow run: the same run when the sweep resumes; a sweep started over gets a new one."""
    params = {"sweep.metric": spec.metric, "sweep.mode": spec.mode, "sweep.samples": spec.samples,
              "sweep.seeds": ",".join(map(str, spec.seeds or [])) or "-",
              "sweep.scheduler": spec.scheduler, "sweep.trials": len(state["trials"]) * spec.samples,
              "sweep.keys": ",".join(spec.space) or "-", "sweep.variants": ",".join(v.name for v in spec.variants) or "-"}
    run_id, found = tracker.keyed_run(experiment, SWEEP_KEY_TAG, f"sweep:{spec.root}", f"sweep-{spec.name}",
                                      tags={"pgseg.sweep": spec.name}, params=params, resume=resume)
    if not found:
        tracker.log_dict(run_id, state, "sweep.json")
    return run_id


def _close_trial_runs(tracker: Tracker, parent: str, rows: list[TrialRow], experiment: str, scheduler: str) -> None:
    """Link each row to its MLflow run; a trial the scheduler stopped (its training never returned) is marked."""
    by_trial = {r.data.tags.get("pgseg.trial_id"): r for r in tracker.children(experiment, parent)}
    for row in rows:
        run = by_trial.get(row.trial_id)
        if run is None:
            continue
        row.run_id = run.info.run_id
        if row.status == "stopped early" and run.info.status != "FINISHED":
            # the trial's actor was stopped: its training never returned (fit leaves a trial's failed run to us)
            tracker.end(row.run_id, "KILLED", {"pgseg.state": f"stopped by the {scheduler} scheduler at step "
                                                              f"{row.step} of {row.total_steps}"})
        elif row.status == "failed" and run.info.status == "RUNNING":
            tracker.end(row.run_id, "FAILED", {"pgseg.error": row.error or ""})


def _check_state(root: Path, state: dict[str, Any], resume: bool, name: str) -> None:
    """A sweep folder resumes only the sweep it was started with; a new one records its state."""
    state_file = root / STATE_FILE
    if not resume:
        atomic_write_json(state_file, {"digest": value_digest(state), **state})
        return
    try:
        before = json.loads(state_file.read_text())["digest"]
    except (OSError, ValueError, KeyError):
        before = None
    if before != value_digest(state):
        raise ConfigError(f"name: the sweep {name!r} at {root} was started from another sweep file or base "
                          f"config; give this one another name, or remove {root} to start it over")


def _tuner(spec: SweepSpec, trainable: Any, setup: TrialSetup, max_steps: int, concurrent: int) -> tune.Tuner:
    scheduler = None
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=spec.asha.grace_steps,
                                  reduction_factor=spec.asha.reduction_factor)
    return tune.Tuner(
        trainable, param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.samples,
                                    scheduler=scheduler, max_concurrent_trials=concurrent,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(spec.root), verbose=0,
                                  callbacks=[SweepProgress(setup)],
                                  failure_config=tune.FailureConfig(max_failures=0)))


def run_sweep(spec: SweepSpec, *, printer: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) the sweep on the attached Ray cluster; returns its rows and summary."""
    root = spec.root
    base = spec.config()
    plans = []
    for label, values in spec.trial_values():  # every trial's data and eval sets are there before one starts
        try:
            plans.append(plan_training(spec.config(values)))
        except ConfigError as exc:
            raise ConfigError(f"trial {label}: {exc}") from None
    during, final = ([open_dataset(s).name for s in sets] for sets in (base.eval.datasets, base.eval.final_datasets))
    check_metric(spec, during, final)
    eval_sets = during + final
    concurrent = concurrent_trials(base, spec.trainable_cpus, spec.max_concurrent, *cluster_resources())
    state = _state(spec, [to_dict(p.config) for p in plans])
    tune_path = root / TUNE_DIR
    resume = tune.Tuner.can_restore(str(tune_path))
    _check_state(root, state, resume, spec.name)
    tracker = Tracker(base.tracking.uri, check=True) if base.tracking.enabled else None
    parent = _start_parent(tracker, spec, base.tracking.experiment, state, resume) if tracker else None
    setup = TrialSetup(spec, str(root / RUNS_DIR), tracker.uri if tracker else None, parent, os.getcwd())
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": spec.trainable_cpus})
    trials = len(plans) * spec.samples
    printer(f"sweep {spec.name}: {trials} trial(s), at most {concurrent} at a time, optimising {spec.metric} "
            f"({spec.mode}); {'resuming' if resume else 'state'} in {root}")
    if resume:
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_errored=True)
    else:
        tuner = _tuner(spec, trainable, setup, max(p.total_steps for p in plans), concurrent)
    results = tuner.fit()
    ended = ended_trials(root)
    done = sum(Path(r.path).name.removeprefix("trial_") in ended for r in results)
    if done < trials:  # stopped by SIGINT / SIGTERM: Tune saved its state
        if parent:
            tracker.end(parent, "KILLED")
        raise SweepInterrupted(f"{done} of {trials} trial(s) ended; run the same command again to resume the sweep "
                               f"in {root}")
    rows = trial_rows(spec, setup, results)
    if parent:
        _close_trial_runs(tracker, parent, rows, base.tracking.experiment, spec.scheduler)
    table = summary_table(spec, rows, eval_sets)
    text = markdown(table)
    scored = [r for r in rows if r.status != "failed" and spec.metric in r.last]
    best = (max if spec.mode == "max" else min)(scored, key=lambda r: r.last[spec.metric]) if scored else None
    atomic_write_json(root / "summary.json", table)
    atomic_write_bytes(root / "summary.md", text.encode())
    keys = (["variant"] if len(spec.variants) > 1 else []) + list(spec.space)
    plots = [plot_metric(spec, rows, key, root / "plots" / f"{key}.png") for key in keys]
    statistics = verdicts = None
    if spec.seeds:
        statistics = seed_statistics(spec, rows)
        verdicts = [verdict(line, spec.baseline_name) for line in statistics if line["pairs"] is not None]
        stats_text = markdown(statistics) + "".join(f"\n- {v}" for v in verdicts) + ("\n" if verdicts else "")
        atomic_write_json(root / "summary_seeds.json", {"seeds": spec.seeds, "metric": spec.metric,
                                                       "statistics": statistics, "verdicts": verdicts})
        atomic_write_bytes(root / "summary_seeds.md", stats_text.encode())
        plots.append(plot_statistics(spec, rows, statistics, root / "plots" / "seeds.png"))
        text = text + "\n" + stats_text
    if parent:
        tracker.log_table(parent, table, "summary.json")
        if statistics is not None:
            tracker.log_table(parent, statistics, "summary_seeds.json")
        tracker.log_text(parent, text, "summary.md")
        for path in plots:
            tracker.log_artifact(parent, path, "plots")
        tags = {"pgseg.trials": ", ".join(f"{r.label}: {r.status}" for r in rows)[:5000]}
        if best is not None:
            tracker.log_metrics(parent, {f"best/{spec.metric}": best.last[spec.metric]})
            tags["pgseg.best_trial"] = best.label
        tracker.end(parent, "FINISHED" if all(r.status != "failed" for r in rows) else "FAILED", tags)
    return SweepResult(spec.name, root, rows, table, text, parent, best, statistics, verdicts)
