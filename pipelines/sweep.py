"""Ray Tune sweeps: ``pgseg sweep --config SWEEP.yaml`` — the paper's ablations (Tables 4 and 5, the threshold phi,
the weights lambda and beta, the released code's quirks) as many training runs, read as one table.

A sweep file names the training config its trials start from (``base``: a preset or YAML, or ``experiment``: an
experiment whose sources and download stages provide the data and whose training section is the base), overrides
(``set``), a search space over any config keys (grid, choice, uniform, loguniform) and/or named variants (the rows
of a table), the metric to optimise, samples, a scheduler (none or ASHA on the metric reported with each
checkpoint) and the Tune trainable's CPUs. Every key is checked against the config schema before anything runs.

Each trial is a Tune function trainable that builds and fits the training pipeline's ``TorchTrainer``
(:func:`pipelines.train.fit`) with ``TuneReportCallback``; its Ray Train run lives under the sweep's folder and is
named by the trial, so an interrupted sweep (``Tuner.restore``) reruns only unfinished trials, and those continue
from their own checkpoints. MLflow: one parent run per sweep, one child run per trial, and at the end the summary
table (one row per trial, mIoU per eval set, the delta against the baseline row) and a plot per swept key.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from pgseg.config import ConfigError, load_config
from pgseg.config.load import from_dict, read_mapping, to_dict
from pipelines.digest import value_digest

log = logging.getLogger(__name__)

SAMPLERS = ("grid", "choice", "uniform", "loguniform")
SWEEP_KEY_TAG = "pgseg.sweep_key"
STATE_FILE = "sweep.json"  # the sweep file and base config a sweep folder was started with
TUNE_DIR = "tune"  # Tune's experiment state (Tuner.restore reads it)
RUNS_DIR = "runs"  # the trials' Ray Train runs (checkpoints, model files)
ENDED_DIR = "ended"  # one mark per trial that ended (finished, stopped by the scheduler or failed)


@dataclass
class Variant:
    name: str = ""
    set: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value


@dataclass
class AshaSettings:
    grace_steps: int = 100
    reduction_factor: int = 2


@dataclass
class SweepSpec:
    name: str = ""
    base: str | None = None  # a training config: preset name or YAML path (relative to the sweep file)
    experiment: str | None = None  # or an experiment: its data stages run first, its training section is the base
    set: list[str] = field(default_factory=list)  # overrides of the base, KEY=VALUE
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> {grid|choice: [..]} or {uniform|loguniform: [lo, hi]}
    variants: list[Variant] = field(default_factory=list)
    baseline: str | None = None  # the variant the summary's deltas are taken against (default: the first)
    metric: str = "eval/dev/mIoU"
    mode: Literal["max", "min"] = "max"
    samples: int = 1
    scheduler: Literal["none", "asha"] = "none"
    asha: AshaSettings = field(default_factory=AshaSettings)
    trainable_cpus: float = 0.2  # the Tune trainable itself; the trainers' workers take config.train's resources
    max_concurrent: int | None = None  # None: as many as the cluster's CPUs (and GPUs) allow
    workdir: str | None = None  # default: the experiment's workdir, else outputs; the sweep writes <workdir>/sweeps/<name>
    source_dir: str = "."
    base_source: Any = field(default=None, init=False)  # what load_config starts from: a preset/path or a mapping
    data_stages: Any = field(default=None, init=False, repr=False)  # the experiment's sources/download (Experiment)

    @property
    def root(self) -> Path:
        return Path(self.workdir or "outputs").resolve() / "sweeps" / self.name

    @property
    def baseline_name(self) -> str:
        return self.baseline or (self.variants[0].name if self.variants else "default")

    def config(self, overrides: list[str] = ()):
        """The training config of one trial: the base, the sweep's ``set``, then ``overrides``."""
        return load_config(self.base_source, [*self.set, *overrides])

    def grid_points(self) -> list[dict[str, Any]]:
        grids = {k: v["grid"] for k, v in self.space.items() if "grid" in v}
        keys = sorted(grids)
        return [dict(zip(keys, values)) for values in itertools.product(*(grids[k] for k in keys))] or [{}]

    def trial_overrides(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, {key: value}) of each variant × grid point (sampled keys are drawn by Tune and not listed)."""
        out = []
        for variant, point in itertools.product(self.variants or [Variant("default", {})], self.grid_points()):
            out.append((trial_label(variant.name, point), {**variant.set, **point}))
        return out


def trial_label(variant: str, values: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return (variant + "".join(f" {k}={show(v)}" for k, v in sorted(values.items()))).strip()


def _as_override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"


def _check(spec: SweepSpec, overrides: list[str], where: str) -> None:
    try:
        spec.config(overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_sweep(path: str | Path, overrides: list[str] = (), workdir: str | None = None) -> SweepSpec:
    """Read and check a sweep file; ``overrides`` (KEY=VALUE) are added to its ``set``. Every problem is a
    ConfigError naming the key, before anything runs."""
    path = Path(path)
    raw = read_mapping(path, "sweep")
    raw["source_dir"] = str(path.parent.resolve())
    spec = from_dict(SweepSpec, raw)
    spec.set = [*spec.set, *overrides]
    if not spec.name.strip() or "/" in spec.name:
        raise ConfigError(f"name: a sweep needs a name without '/', got {spec.name!r}")
    if (spec.base is None) == (spec.experiment is None):
        raise ConfigError("base/experiment: name either the training config the trials start from (base) or an "
                          "experiment whose data and training section they use (experiment), not both")
    if spec.experiment is not None:
        from pipelines.workflow import load_experiment, train_section

        experiment = load_experiment(Path(spec.source_dir) / spec.experiment,
                                     [f"workdir={workdir}"] if workdir else [])
        if experiment.train is None:
            raise ConfigError(f"experiment: {spec.experiment} has no train section for the trials to start from")
        spec.experiment = str(Path(spec.source_dir) / spec.experiment)
        spec.base_source = train_section(experiment)
        spec.workdir = str(experiment.root)
        if experiment.sources is not None or experiment.download is not None:
            from dataclasses import replace

            spec.data_stages = replace(experiment, train=None, evaluate=None)
    else:
        local = Path(spec.source_dir) / spec.base
        spec.base_source = spec.base = str(local) if local.is_file() else spec.base
        spec.workdir = workdir or spec.workdir
    _check(spec, [], "base/set")
    if not spec.space and not spec.variants:
        raise ConfigError("space: the search space is empty (give space keys or variants)")
    for key, sampler in spec.space.items():
        where = f"space.{key}"
        if not isinstance(sampler, dict) or len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(SAMPLERS)}: ...}}, got {sampler!r}")
        kind, values = next(iter(sampler.items()))
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{kind}: give a non-empty list of values")
            for value in values:
                _check(spec, [_as_override(key, value)], where)
        else:
            if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
                    and values[0] < values[1] and (kind == "uniform" or values[0] > 0)):
                raise ConfigError(f"{where}.{kind}: give [low, high] with low < high" +
                                  (" and low > 0" if kind == "loguniform" else ""))
            _check(spec, [_as_override(key, values[0])], where)
    names = [v.name for v in spec.variants]
    if any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"variants: every variant needs a name of its own, got {names}")
    for i, variant in enumerate(spec.variants):  # checked whole: keys may only be valid together
        _check(spec, [_as_override(k, v) for k, v in variant.set.items()], f"variants[{i}] ({variant.name})")
    if spec.baseline is not None and spec.baseline not in names:
        raise ConfigError(f"baseline: {spec.baseline!r} is not one of the variants {names}")
    if spec.samples < 1:
        raise ConfigError("samples: must be >= 1")
    if spec.trainable_cpus <= 0:
        raise ConfigError("trainable_cpus: must be > 0")
    if spec.max_concurrent is not None and spec.max_concurrent < 1:
        raise ConfigError("max_concurrent: must be >= 1 (or null: as many as the cluster allows)")
    if spec.scheduler == "asha" and (spec.asha.grace_steps < 1 or spec.asha.reduction_factor < 2):
        raise ConfigError("asha: grace_steps must be >= 1 and reduction_factor >= 2")
    return spec


# ------------------------------------------------------------------------------------------------ the trials
def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


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
        """(variant name, label, the swept values) of a trial's Tune parameters."""
        name = self.variant(params).name
        values = {key: params[key] for key in self.spec.space}
        return name, trial_label(name, values), values

    def overrides(self, params: dict[str, Any]) -> list[str]:
        values = {**self.variant(params).set, **self.describe(params)[2]}
        return [_as_override(k, v) for k, v in values.items()]


def _for_tune(metrics: dict[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """A non-finite value of the sweep metric becomes the worst value: ASHA compares NaN with nothing, so a diverged
    trial would never be stopped."""
    value = metrics.get(metric)
    if isinstance(value, (int, float)) and not math.isfinite(value):
        return {**metrics, metric: -math.inf if mode == "max" else math.inf}
    return metrics


class TrialReport(TuneReportCallback):
    """Ray Train's reports forwarded to Tune (from the Train controller), but for the last step's: the trainable
    reports that one itself once ``fit`` has returned, so a scheduler's stop on it cannot cut the model export and
    the MLflow run's end."""

    def __init__(self, metric: str, mode: str):
        super().__init__()
        self.metric, self.mode = metric, mode

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = metrics[0] if metrics else {}
        if first.get("step", 0) >= first.get("total_steps", math.inf):
            return
        super().after_report(run_context, [_for_tune(first, self.metric, self.mode), *metrics[1:]], checkpoint)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: one training run of the sweep, with its metrics forwarded to Tune."""
    import ray.data
    from ray import tune

    from pipelines.train import TrainingError, fit, plan_training

    if os.path.isdir(setup.cwd):
        os.chdir(setup.cwd)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver prints one line per report
    trial_id = tune.get_context().get_trial_id()
    variant, label, values = setup.describe(params)
    run = [f"train.name=trial_{trial_id}", f"train.storage_path={setup.runs}",
           _as_override("tracking.run_name", f"{setup.spec.name}: {label}")]
    if setup.uri:
        run.append(f"tracking.uri={setup.uri}")
    plan = plan_training(setup.spec.config([*setup.overrides(params), *run]))
    tags = {"pgseg.sweep": setup.spec.name, "pgseg.trial": label, "pgseg.trial_id": trial_id}
    if setup.parent:
        tags["mlflow.parentRunId"] = setup.parent
    result = fit(plan, callbacks=[TrialReport(setup.spec.metric, setup.spec.mode)], run_tags=tags,
                 run_params={"trial.variant": variant, **{f"trial.{k}": v for k, v in values.items()}})
    if not result.finished:
        raise TrainingError(f"trial {label}: training stopped at step {result.step} of {result.total_steps}")
    tune.report(_for_tune(result.metrics, setup.spec.metric, setup.spec.mode))


def param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {"variant": tune.grid_search(list(range(len(spec.variants)))) if spec.variants else 0}
    for key, sampler in spec.space.items():
        kind, values = next(iter(sampler.items()))
        space[key] = {"grid": tune.grid_search, "choice": tune.choice}[kind](values) if kind in ("grid", "choice") \
            else {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*values)
    return space


class SweepProgress(Callback):
    """One line per trial start, report and end (the sweep's own progress, printed by the driver)."""

    def __init__(self, trial_setup: TrialSetup):
        self.trial_setup = trial_setup

    def _label(self, trial: Any) -> str:
        return f"trial {trial.trial_id} ({self.trial_setup.describe(trial.config)[1]})"

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[sweep] {self._label(trial)} started", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metric = self.trial_setup.spec.metric
        value = result.get(metric)
        if isinstance(value, (int, float)):
            print(f"[sweep] {self._label(trial)} step {result.get('step')}/{result.get('total_steps')}: "
                  f"{metric} {value:.4f}", flush=True)

    def _ended(self, trial: Any, how: str) -> None:
        """Marks the trial as ended (finished, stopped by the scheduler, failed); an interrupted one gets no mark."""
        from pgseg.fileio import atomic_write_json

        atomic_write_json(Path(self.trial_setup.spec.root) / ENDED_DIR / f"{trial.trial_id}.json", {"ended": how})
        print(f"[sweep] {self._label(trial)} {how}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, "ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "failed")


# ------------------------------------------------------------------------------------------------ the results
@dataclass
class TrialRow:
    trial_id: str
    variant: str
    label: str
    values: dict[str, Any]  # the swept keys' values
    status: Literal["finished", "stopped early", "failed"]
    step: int
    total_steps: int
    last: dict[str, float]  # measure -> its last reported value
    best: float | None  # the sweep metric's best reported value
    run_id: str | None = None
    error: str | None = None


def measures(spec: SweepSpec, eval_sets: list[str]) -> list[str]:
    """What the summary shows per trial: each eval set's mIoU, and the sweep metric if it is none of them."""
    out = [f"eval/{name}/mIoU" for name in eval_sets]
    return out + ([spec.metric] if spec.metric not in out else [])


def _display(measure: str) -> str:
    parts = measure.split("/")
    return f"{parts[1]} mIoU" if len(parts) == 3 and parts[0] == "eval" and parts[2] == "mIoU" else measure


def _scaled(measure: str, value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return value  # missing, or diverged (shown as nan / inf)
    return round(100 * value, 2) if measure.endswith("mIoU") else round(value, 4)


def summary_table(spec: SweepSpec, rows: list[TrialRow], eval_sets: list[str]) -> list[dict[str, Any]]:
    """One row per trial (the paper's Tables 4 and 5): the swept values, status, each eval set's mIoU in % and its
    delta against the baseline row (with variants: the baseline variant at the same grid point; else the first
    trial), the metric's best value."""
    grid = sorted(k for k, v in spec.space.items() if "grid" in v)
    shown = measures(spec, eval_sets)

    def baseline_of(row: TrialRow) -> TrialRow | None:
        if not spec.variants:
            return rows[0]
        candidates = [r for r in rows if r.variant == spec.baseline_name]
        same = [r for r in candidates if all(r.values.get(k) == row.values.get(k) for k in grid)]
        return (same or candidates or [None])[0]

    table = []
    for row in rows:
        base = baseline_of(row)
        line: dict[str, Any] = {"trial": row.label}
        if spec.variants and spec.space:  # (without a space, the label is the variant)
            line["variant"] = row.variant
        line.update({k: row.values.get(k) for k in spec.space})
        line.update({"status": row.status, "steps": f"{row.step}/{row.total_steps}"})
        for measure in shown:
            value = _scaled(measure, row.last.get(measure))
            ref = _scaled(measure, base.last.get(measure)) if base is not None else None
            line[_display(measure)] = value
            line[f"Δ {_display(measure)}"] = round(value - ref, 2 if measure.endswith("mIoU") else 4) \
                if value is not None and ref is not None and math.isfinite(value - ref) else None
        line[f"best {_display(spec.metric)}"] = _scaled(spec.metric, row.best)
        table.append(line)
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    if not table:
        return "(no trials)\n"
    columns = list(table[0])

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):  # (measures are rounded already; swept values are shown as given)
            return f"{v:.6g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in table]
    return "\n".join(lines) + "\n"


def plot_metric(spec: SweepSpec, rows: list[TrialRow], key: str, path: Path) -> Path:
    """The sweep metric's last value of each trial against one swept key (the variant, for named variants)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if spec.metric in r.last]
    xs = [r.variant if key == "variant" else r.values.get(key) for r in done]
    ys = [_scaled(spec.metric, r.last[spec.metric]) for r in done]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    numeric = key != "variant" and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    if numeric:
        ax.scatter(xs, ys)
        if "loguniform" in spec.space.get(key, {}):
            ax.set_xscale("log")
    else:
        names = list(dict.fromkeys(str(x) for x in xs))
        ax.scatter([names.index(str(x)) for x in xs], ys)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_xlabel(key)
    ax.set_ylabel(_display(spec.metric) + (" (%)" if spec.metric.endswith("mIoU") else ""))
    ax.set_title(f"{spec.name}: {_display(spec.metric)} (last value) by {key}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.rows)


# ------------------------------------------------------------------------------------------------ the driver
def _state(spec: SweepSpec, trial_configs: list[dict[str, Any]]) -> dict[str, Any]:
    keep = ("name", "metric", "mode", "samples", "scheduler", "space", "variants", "baseline", "asha")
    raw = {**to_dict(spec), "variants": [to_dict(v) for v in spec.variants]}
    return {"sweep": {k: raw[k] for k in keep}, "trials": trial_configs}


def check_metric(spec: SweepSpec, eval_sets: list[str]) -> None:
    parts = spec.metric.split("/")
    if parts[0] != "eval":
        return  # a training metric (loss, loss/<term>, ...): reported with every checkpoint
    if not eval_sets:
        raise ConfigError(f"metric: {spec.metric} needs evaluation during training; the trials' config has no "
                          f"eval.datasets")
    if len(parts) == 3 and parts[1] not in eval_sets:
        raise ConfigError(f"metric: {spec.metric} names eval set {parts[1]!r}; the trials score "
                          f"{', '.join(eval_sets)} (eval.datasets)")
    if spec.metric != "eval/best_mIoU" and (len(parts) != 3 or parts[2] != "mIoU"):
        raise ConfigError(f"metric: {spec.metric}: expected eval/<set>/mIoU or eval/best_mIoU")


def trial_resources(spec: SweepSpec, config: Any, cpus: float, gpus: float) -> int:
    """How many trials run at once: each takes its workers, the trainable and a CPU for Ray Data's tasks."""
    from pipelines.train import DATA_CPUS

    t = config.train
    per_trial = t.workers * t.cpus_per_worker + spec.trainable_cpus
    if per_trial + DATA_CPUS > cpus + 1e-9:
        raise ConfigError(f"trainable_cpus: a trial takes {t.workers} worker(s) × train.cpus_per_worker "
                          f"{t.cpus_per_worker} + trainable_cpus {spec.trainable_cpus} = {per_trial:g} CPUs, plus "
                          f"{DATA_CPUS:g} for Ray Data, but the cluster has {cpus:g}; lower train.workers, "
                          f"train.cpus_per_worker or trainable_cpus")
    limit = int((cpus + 1e-9) // (per_trial + DATA_CPUS))
    if t.use_gpu:
        if t.workers > gpus:
            raise ConfigError(f"train.use_gpu: a trial's {t.workers} worker(s) need {t.workers} GPUs, the cluster "
                              f"has {gpus:g}")
        limit = min(limit, int(gpus // t.workers))
    return max(1, min(spec.max_concurrent or limit, limit))


def _start_parent(spec: SweepSpec, uri: str, experiment: str, state: dict[str, Any], resume: bool) -> str:
    """The sweep's MLflow run: the same run when the sweep resumes; a sweep started over gets a new one (an older
    run of the same folder loses its key)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import _experiment_id, create_run

    client = MlflowClient(uri)
    exp_id = _experiment_id(client, experiment)
    key = f"sweep:{spec.root}"
    found = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_KEY_TAG}` = '{key}'")
    if found and resume:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    for old in found:
        client.set_tag(old.info.run_id, SWEEP_KEY_TAG, f"{key} (started over)")
        if old.info.status == "RUNNING":
            client.set_terminated(old.info.run_id, "KILLED")
    params = {"sweep.metric": spec.metric, "sweep.mode": spec.mode, "sweep.samples": spec.samples,
              "sweep.scheduler": spec.scheduler, "sweep.trials": len(state["trials"]) * spec.samples,
              "sweep.keys": ",".join(spec.space) or "-", "sweep.variants": ",".join(v.name for v in spec.variants) or "-"}
    run_id = create_run(client, exp_id, f"sweep-{spec.name}", {SWEEP_KEY_TAG: key, "pgseg.sweep": spec.name}, params)
    client.log_dict(run_id, state, "sweep.json")
    return run_id


def _rows(spec: SweepSpec, setup: TrialSetup, results: Any) -> list[TrialRow]:
    rows = []
    for result in results:
        trial_id = Path(result.path).name.removeprefix("trial_")
        variant, label, values = setup.describe(result.config)
        frame = result.metrics_dataframe
        last: dict[str, float] = {}
        best = None
        step = total = 0
        if frame is not None and len(frame):
            for column in frame.columns:  # every report after the first eval carries the eval keys
                if (column.startswith("eval/") or column == spec.metric) and frame[column].notna().any():
                    last[column] = float(frame[column].iloc[-1])
            if spec.metric in frame.columns and frame[spec.metric].notna().any():
                best = float(frame[spec.metric].max() if spec.mode == "max" else frame[spec.metric].min())
            step = int(frame["step"].dropna().iloc[-1]) if "step" in frame.columns else 0
            total = int(frame["total_steps"].dropna().iloc[-1]) if "total_steps" in frame.columns else 0
        if result.error is not None:
            status, error = "failed", str(result.error).strip().splitlines()[-1][:500]
        else:
            status, error = ("finished" if total and step >= total else "stopped early"), None
        rows.append(TrialRow(trial_id, variant, label, values, status, step, total, last, best, error=error))
    order = {label: i for i, (label, _) in enumerate(spec.trial_overrides())}
    return sorted(rows, key=lambda r: (order.get(trial_label(r.variant, {k: r.values[k] for k in spec.space
                                                                           if "grid" in spec.space[k]}), 0),
                                       r.trial_id))


def _close_trial_runs(uri: str, parent: str, rows: list[TrialRow], experiment: str, scheduler: str) -> None:
    """Link each row to its MLflow run; a trial the scheduler stopped (its training never returned) is marked."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    by_trial = {r.data.tags.get("pgseg.trial_id"): r for r in runs}
    for row in rows:
        run = by_trial.get(row.trial_id)
        if run is None:
            continue
        row.run_id = run.info.run_id
        if row.status == "stopped early" and run.info.status != "FINISHED":
            # the trial's actor was stopped: its training either never returned or saw the stop as an error
            if "pgseg.error" in run.data.tags:
                client.delete_tag(row.run_id, "pgseg.error")
            client.set_tag(row.run_id, "pgseg.state", f"stopped by the {scheduler} scheduler at step "
                                                      f"{row.step} of {row.total_steps}")
            client.set_terminated(row.run_id, "KILLED")
        elif row.status == "failed" and run.info.status == "RUNNING":
            client.set_tag(row.run_id, "pgseg.error", row.error or "")
            client.set_terminated(row.run_id, "FAILED")


def run_sweep(spec: SweepSpec, *, printer: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) the sweep on the attached Ray cluster; returns its rows and summary."""
    import ray
    from ray import tune

    from pgseg.datasets import open_dataset
    from pipelines.tracking import resolve_uri
    from pipelines.train import plan_training

    root = spec.root
    base = spec.config()
    plans = []
    for label, values in spec.trial_overrides():  # every trial's data and eval sets are there before one starts
        try:
            plans.append(plan_training(spec.config([_as_override(k, v) for k, v in values.items()])))
        except ConfigError as exc:
            raise ConfigError(f"trial {label}: {exc}") from None
    eval_sets = [open_dataset(s).name for s in base.eval.datasets]
    check_metric(spec, eval_sets)
    resources = ray.cluster_resources()
    concurrent = trial_resources(spec, base, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
    state = _state(spec, [to_dict(p.config) for p in plans])
    tune_path = root / TUNE_DIR
    resume = tune.Tuner.can_restore(str(tune_path))
    state_file = root / STATE_FILE
    if resume:
        try:
            before = json.loads(state_file.read_text())["digest"]
        except (OSError, ValueError, KeyError):
            before = None
        if before != value_digest(state):
            raise ConfigError(f"name: the sweep {spec.name!r} at {root} was started from another sweep file or base "
                              f"config; give this one another name, or remove {root} to start it over")
    else:
        from pgseg.fileio import atomic_write_json

        atomic_write_json(state_file, {"digest": value_digest(state), **state})
    uri = resolve_uri(base.tracking.uri) if base.tracking.enabled else None
    parent = _start_parent(spec, uri, base.tracking.experiment, state, resume) if uri else None
    setup = TrialSetup(spec, str(root / RUNS_DIR), uri, parent, os.getcwd())
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": spec.trainable_cpus})
    trials = len(plans) * spec.samples
    printer(f"sweep {spec.name}: {trials} trial(s), at most {concurrent} at a time, optimising {spec.metric} "
            f"({spec.mode}); {'resuming' if resume else 'state'} in {root}")
    if resume:
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_errored=True)
    else:
        scheduler = None
        if spec.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="step", max_t=max(p.total_steps for p in plans),
                                      grace_period=spec.asha.grace_steps,
                                      reduction_factor=spec.asha.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.samples,
                                        scheduler=scheduler, max_concurrent_trials=concurrent,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(root), verbose=0,
                                      callbacks=[SweepProgress(setup)],
                                      failure_config=tune.FailureConfig(max_failures=0)))
    results = tuner.fit()
    ended = {p.stem for p in (root / ENDED_DIR).glob("*.json")}
    done = sum(Path(r.path).name.removeprefix("trial_") in ended for r in results)
    if done < trials:  # stopped by SIGINT / SIGTERM: Tune saved its state
        if uri and parent:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).set_terminated(parent, "KILLED")
        raise SweepInterrupted(f"{done} of {trials} trial(s) ended; run the same command again to resume the sweep "
                               f"in {root}")
    rows = _rows(spec, setup, results)
    if uri and parent:
        _close_trial_runs(uri, parent, rows, base.tracking.experiment, spec.scheduler)
    table = summary_table(spec, rows, eval_sets)
    text = markdown(table)
    scored = [r for r in rows if r.status != "failed" and spec.metric in r.last]
    best = (max if spec.mode == "max" else min)(scored, key=lambda r: r.last[spec.metric]) if scored else None
    from pgseg.fileio import atomic_write_bytes, atomic_write_json

    atomic_write_json(root / "summary.json", table)
    atomic_write_bytes(root / "summary.md", text.encode())
    keys = (["variant"] if len(spec.variants) > 1 else []) + list(spec.space)
    plots = [plot_metric(spec, rows, key, root / "plots" / f"{key}.png") for key in keys]
    if uri and parent:
        import pandas as pd
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        client.log_table(parent, pd.DataFrame(table), "summary.json")
        client.log_text(parent, text, "summary.md")
        for path in plots:
            client.log_artifact(parent, str(path), "plots")
        if best is not None:
            client.log_metric(parent, f"best/{spec.metric}", best.last[spec.metric])
            client.set_tag(parent, "pgseg.best_trial", best.label)
        client.set_tag(parent, "pgseg.trials", ", ".join(f"{r.label}: {r.status}" for r in rows)[:5000])
        client.set_terminated(parent, "FINISHED" if all(r.status != "failed" for r in rows) else "FAILED")
    return SweepResult(spec.name, root, rows, table, text, parent, best)
