"""A seeded sweep's statistics: per variant (and grid point) the sweep metric's mean ± std over the seeds with a 95 %
confidence interval (Student's t), and its difference from the baseline variant paired by seed, with the interval
and the paired t-test's p-value (scipy.stats). A trial that failed or whose metric is not finite (diverged) is
counted and shown; the figures are over the trials that gave a finite value."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from pgseg.plots import pyplot
from pipelines.tune.report import TrialRow, display_name, save_plot, scaled
from pipelines.tune.spec import SEED, SweepSpec, trial_label

LEVEL = 0.95


def interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, std, CI low, CI high) of ``values``: the sample std (n − 1) and the t interval of the mean; nan where
    fewer than two values leave them undefined."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    if std == 0:
        return mean, 0.0, mean, mean
    low, high = stats.t.interval(LEVEL, df=x.size - 1, loc=mean, scale=std / math.sqrt(x.size))
    return mean, std, float(low), float(high)


def _point(spec: SweepSpec, row: TrialRow) -> tuple[Any, ...]:
    return tuple(row.values.get(k) for k in sorted(spec.space) if "grid" in spec.space[k])


def _value(spec: SweepSpec, row: TrialRow) -> float | None:
    """The row's metric (in % for an mIoU), None when the trial failed or diverged."""
    value = scaled(spec.metric, row.last.get(spec.metric)) if row.status != "failed" else None
    return value if value is not None and math.isfinite(value) else None


def seed_statistics(spec: SweepSpec, rows: list[TrialRow]) -> list[dict[str, Any]]:
    """One row per variant × grid point (in the sweep's order): runs, diverged, the metric's mean, std and interval,
    and the paired difference from the baseline variant at the same grid point."""
    grid = sorted(k for k, v in spec.space.items() if "grid" in v)
    groups: dict[tuple[str, tuple[Any, ...]], list[TrialRow]] = {}
    for row in rows:
        groups.setdefault((row.variant, _point(spec, row)), []).append(row)
    name = display_name(spec.metric)
    out = []
    for (variant, point), members in groups.items():
        by_seed = {r.values.get(SEED): _value(spec, r) for r in members}
        finite = [v for v in by_seed.values() if v is not None]
        mean, std, low, high = interval(finite)
        line: dict[str, Any] = {"variant": trial_label(variant, dict(zip(grid, point)))}
        line.update({"runs": len(members), "diverged": len(members) - len(finite),
                     f"{name} mean": mean, "std": std, "CI95 low": low, "CI95 high": high})
        base = groups.get((spec.baseline_name, point)) if spec.variants else None
        if base is not None and variant != spec.baseline_name:
            ref = {r.values.get(SEED): _value(spec, r) for r in base}
            pairs = [(by_seed[s], ref[s]) for s in by_seed if s in ref and by_seed[s] is not None
                     and ref[s] is not None]
            diffs = [a - b for a, b in pairs]
            d_mean, _, d_low, d_high = interval(diffs)
            p = float(stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue) \
                if len(pairs) >= 2 and np.std(diffs) > 0 else math.nan
            line.update({"pairs": len(pairs), "Δ mean": d_mean, "Δ CI95 low": d_low, "Δ CI95 high": d_high, "p": p})
        else:
            line.update({"pairs": None, "Δ mean": None, "Δ CI95 low": None, "Δ CI95 high": None, "p": None})
        out.append({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in line.items()})
    return out


def verdict(line: dict[str, Any], baseline: str) -> str:
    """A sentence for one statistics row against the baseline."""
    low, high = line.get("Δ CI95 low"), line.get("Δ CI95 high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{line['variant']}: no interval against {baseline} (fewer than two paired seeds)"
    where = "above zero" if low > 0 else "below zero" if high < 0 else "includes zero"
    return (f"{line['variant']} − {baseline}: {line['Δ mean']:+.2f} points, 95 % CI [{low:+.2f}, {high:+.2f}] "
            f"over {line['pairs']} paired seeds ({where})")


def plot_statistics(spec: SweepSpec, rows: list[TrialRow], table: list[dict[str, Any]], path: Path) -> Path:
    """Each variant's seeds as points, their mean with the 95 % interval as an error bar."""
    plt = pyplot()
    grid = sorted(k for k, v in spec.space.items() if "grid" in v)
    labels = [line["variant"] for line in table]
    mean_key = f"{display_name(spec.metric)} mean"
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4), dpi=100)
    for i, line in enumerate(table):
        seeds = [_value(spec, r) for r in rows
                 if trial_label(r.variant, dict(zip(grid, _point(spec, r)))) == line["variant"]]
        finite = [v for v in seeds if v is not None]
        ax.scatter([i] * len(finite), finite, color="grey", s=14, zorder=2)
        mean, low, high = line[mean_key], line["CI95 low"], line["CI95 high"]
        if isinstance(mean, float) and math.isfinite(mean):
            err = [[mean - low], [high - mean]] if isinstance(low, float) and math.isfinite(low) else None
            ax.errorbar([i], [mean], yerr=err, fmt="o", color="C0", capsize=6, zorder=3)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    return save_plot(spec, fig, ax, f"{spec.name}: mean and 95 % CI over seeds {spec.seeds}", path)
