"""Sweep files (issue 6, first part): a base training config, a search space over any config keys and/or a list of
named variants (the rows of the paper's Tables 4 and 5), the metric to optimise, samples, scheduler, resources.

Every key is checked against the config schema before anything runs: an unknown key, a value of the wrong type or an
empty search space is a ConfigError naming it. ``SweepSpec.trial_overrides()`` lists what each grid/variant point
sets; the Ray Tune runner builds on it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pgseg.config import ConfigError, load_config
from pgseg.config.load import from_dict, read_mapping

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
    base: str = ""  # a training config: preset name or YAML path (relative to the sweep file)
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
    max_concurrent: int | None = None  # None: as many as the cluster's CPUs allow
    source_dir: str = "."

    def grid_points(self) -> list[dict[str, Any]]:
        grids = {k: v["grid"] for k, v in self.space.items() if "grid" in v}
        keys = sorted(grids)
        return [dict(zip(keys, values)) for values in itertools.product(*(grids[k] for k in keys))] or [{}]

    def trial_overrides(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, {key: value}) of each variant × grid point (sampled keys are drawn by Tune and not listed)."""
        variants = self.variants or [Variant("default", {})]
        out = []
        for variant, point in itertools.product(variants, self.grid_points()):
            label = variant.name + "".join(f" {k}={v}" for k, v in point.items())
            out.append((label.strip(), {**variant.set, **point}))
        return out


def _check_value(base: str, overrides: list[str], key: str, value: Any, where: str) -> None:
    try:
        load_config(base, [*overrides, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    raw = read_mapping(path, "sweep")
    raw["source_dir"] = str(path.parent.resolve())
    spec = from_dict(SweepSpec, raw)
    if not spec.name.strip():
        raise ConfigError("name: a sweep needs a name")
    if not spec.base:
        raise ConfigError("base: name the training config the trials start from")
    local = Path(spec.source_dir) / spec.base
    if local.is_file():
        spec.base = str(local)
    try:
        load_config(spec.base, spec.set)
    except ConfigError as exc:
        raise ConfigError(f"base/set: {exc}") from None
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
                _check_value(spec.base, spec.set, key, value, where)
        else:
            if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
                    and values[0] < values[1] and (kind == "uniform" or values[0] > 0)):
                raise ConfigError(f"{where}.{kind}: give [low, high] with low < high" +
                                  (" and low > 0" if kind == "loguniform" else ""))
            _check_value(spec.base, spec.set, key, values[0], where)
    names = [v.name for v in spec.variants]
    if any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"variants: every variant needs a name of its own, got {names}")
    for i, variant in enumerate(spec.variants):  # checked whole: keys may only be valid together
        try:
            load_config(spec.base, [*spec.set, *(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                                  for k, v in variant.set.items())])
        except ConfigError as exc:
            raise ConfigError(f"variants[{i}] ({variant.name}): {exc}") from None
    if spec.baseline is not None and spec.baseline not in names:
        raise ConfigError(f"baseline: {spec.baseline!r} is not one of the variants {names}")
    if spec.samples < 1:
        raise ConfigError("samples: must be >= 1")
    if spec.trainable_cpus <= 0:
        raise ConfigError("trainable_cpus: must be > 0")
    return spec
