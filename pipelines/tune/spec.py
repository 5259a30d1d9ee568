"""A sweep file, typed and checked: the training config its trials start from (``base``: a preset or YAML, or
``experiment``: an experiment whose sources and download stages provide the data and whose training section is the
base), overrides (``set``), a search space over any config keys (grid, choice, uniform, loguniform) and/or named
variants (the rows of a table), the metric, samples, a scheduler (none or ASHA) and the Tune trainable's CPUs.

The base config is loaded once; a trial's config is that config with the trial's values set by key (typed values,
never text). Every key and value is checked against the config schema before anything runs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pgseg.config import Config, ConfigError, load_config
from pgseg.config.load import from_dict, read_mapping
from pipelines.flow.experiment import DATA_STAGES, STAGES, Experiment, load_experiment, train_section

SAMPLERS = ("grid", "choice", "uniform", "loguniform")


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
    seeds: list[int] | None = None  # each point run once per seed (train.seed and data.seed); the summary pairs by seed
    scheduler: Literal["none", "asha"] = "none"
    asha: AshaSettings = field(default_factory=AshaSettings)
    trainable_cpus: float = 0.2  # the Tune trainable itself; the trainers' workers take config.train's resources
    max_concurrent: int | None = None  # None: as many as the cluster's CPUs (and GPUs) allow
    workdir: str | None = None  # default: the experiment's workdir, else outputs; the sweep writes <workdir>/sweeps/<name>
    source_dir: str = "."
    base_config: Config | None = field(default=None, init=False)  # the base with ``set``: loaded once
    data_stages: Experiment | None = field(default=None, init=False, repr=False)  # the experiment's sources/download

    @property
    def root(self) -> Path:
        return Path(self.workdir or "outputs").resolve() / "sweeps" / self.name

    @property
    def baseline_name(self) -> str:
        return self.baseline or (self.variants[0].name if self.variants else "default")

    def config(self, values: dict[str, Any] | None = None) -> Config:
        """The training config of one trial: the base config with ``values`` (dotted key → value) set."""
        return load_config(self.base_config, values=values)

    def grid_points(self) -> list[dict[str, Any]]:
        grids = {k: v["grid"] for k, v in self.space.items() if "grid" in v}
        keys = sorted(grids)
        return [dict(zip(keys, values)) for values in itertools.product(*(grids[k] for k in keys))] or [{}]

    def trial_values(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, {key: value}) of each variant × grid point × seed (sampled keys are drawn by Tune and not
        listed)."""
        out = []
        for variant, point, seed in itertools.product(self.variants or [Variant("default", {})], self.grid_points(),
                                                      self.seeds or [None]):
            shown = point if seed is None else {**point, SEED: seed}
            out.append((trial_label(variant.name, shown), {**variant.set, **point, **seed_values(seed)}))
        return out


SEED = "seed"  # the trial parameter of a sweep's ``seeds`` (shown in labels and tables)
SEED_KEYS = ("train.seed", "data.seed")  # what a sweep's seed sets: the model's init and noise, the data's order


def seed_values(seed: int | None) -> dict[str, int]:
    return {} if seed is None else dict.fromkeys(SEED_KEYS, seed)


def trial_label(variant: str, values: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return (variant + "".join(f" {k}={show(v)}" for k, v in sorted(values.items()))).strip()


def _check(spec: SweepSpec, values: dict[str, Any], where: str) -> None:
    try:
        spec.config(values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_space(spec: SweepSpec) -> None:
    if not spec.space and not spec.variants and not spec.seeds:
        raise ConfigError("space: the search space is empty (give space keys, variants or seeds)")
    for key, sampler in spec.space.items():
        where = f"space.{key}"
        if not isinstance(sampler, dict) or len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(SAMPLERS)}: ...}}, got {sampler!r}")
        kind, values = next(iter(sampler.items()))
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{kind}: give a non-empty list of values")
            for value in values:
                _check(spec, {key: value}, where)
        else:
            if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
                    and values[0] < values[1] and (kind == "uniform" or values[0] > 0)):
                raise ConfigError(f"{where}.{kind}: give [low, high] with low < high" +
                                  (" and low > 0" if kind == "loguniform" else ""))
            _check(spec, {key: values[0]}, where)
    names = [v.name for v in spec.variants]
    if any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"variants: every variant needs a name of its own, got {names}")
    for i, variant in enumerate(spec.variants):  # checked whole: keys may only be valid together
        _check(spec, variant.set, f"variants[{i}] ({variant.name})")
    if spec.baseline is not None and spec.baseline not in names:
        raise ConfigError(f"baseline: {spec.baseline!r} is not one of the variants {names}")


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
        experiment = load_experiment(Path(spec.source_dir) / spec.experiment,
                                     [f"workdir={workdir}"] if workdir else [])
        if experiment.train is None:
            raise ConfigError(f"experiment: {spec.experiment} has no train section for the trials to start from")
        spec.experiment = str(Path(spec.source_dir) / spec.experiment)
        base: Any = train_section(experiment)
        spec.workdir = str(experiment.root)
        if any(getattr(experiment, stage) is not None for stage in DATA_STAGES):
            spec.data_stages = replace(experiment, **{s: None for s in STAGES if s not in DATA_STAGES})
    else:
        local = Path(spec.source_dir) / spec.base
        base = spec.base = str(local) if local.is_file() else spec.base
        spec.workdir = workdir or spec.workdir
    try:
        spec.base_config = load_config(base, spec.set)
    except ConfigError as exc:
        raise ConfigError(f"base/set: {exc}") from None
    if spec.seeds is not None:
        if (not isinstance(spec.seeds, list) or not spec.seeds or len(set(spec.seeds)) != len(spec.seeds)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in spec.seeds)):
            raise ConfigError(f"seeds: give a non-empty list of distinct integers >= 0, got {spec.seeds!r}")
        taken = [k for k in SEED_KEYS if k in spec.space or any(k in v.set for v in spec.variants)]
        if taken:
            raise ConfigError(f"seeds: {', '.join(taken)} is also swept (space or variants); the sweep's seeds set "
                              f"{' and '.join(SEED_KEYS)}")
    _check_space(spec)
    if spec.samples < 1:
        raise ConfigError("samples: must be >= 1")
    if spec.trainable_cpus <= 0:
        raise ConfigError("trainable_cpus: must be > 0")
    if spec.max_concurrent is not None and spec.max_concurrent < 1:
        raise ConfigError("max_concurrent: must be >= 1 (or null: as many as the cluster allows)")
    if spec.scheduler == "asha" and (spec.asha.grace_steps < 1 or spec.asha.reduction_factor < 2):
        raise ConfigError("asha: grace_steps must be >= 1 and reduction_factor >= 2")
    return spec


def check_metric(spec: SweepSpec, eval_sets: list[str], final_sets: list[str]) -> None:
    """The sweep's metric against the trials' eval sets (scored during training) and final sets (scored once, by
    the final model)."""
    parts = spec.metric.split("/")
    if parts[0] != "eval":
        return  # a training metric (loss, loss/<term>, ...): reported with every checkpoint
    if not eval_sets and not final_sets:
        raise ConfigError(f"metric: {spec.metric} needs evaluation during training; the trials' config has no "
                          f"eval.datasets")
    if len(parts) == 3 and parts[1] not in [*eval_sets, *final_sets]:
        raise ConfigError(f"metric: {spec.metric} names eval set {parts[1]!r}; the trials score "
                          f"{', '.join([*eval_sets, *final_sets])} (eval.datasets, eval.final_datasets)")
    if len(parts) == 3 and parts[1] not in eval_sets and spec.scheduler != "none":
        raise ConfigError(f"metric: {spec.metric} is scored once, by the final model (eval.final_datasets); the "
                          f"{spec.scheduler} scheduler compares trials during training: name a set of eval.datasets "
                          f"or use scheduler: none")
    if spec.metric == "eval/best_mIoU" and not eval_sets:
        raise ConfigError("metric: eval/best_mIoU is the best mIoU of the first of eval.datasets during training; "
                          "the trials' config has only eval.final_datasets: name one of those sets "
                          f"(eval/{final_sets[0]}/mIoU) or add eval.datasets")
    if spec.metric != "eval/best_mIoU" and (len(parts) != 3 or parts[2] != "mIoU"):
        raise ConfigError(f"metric: {spec.metric}: expected eval/<set>/mIoU or eval/best_mIoU")
