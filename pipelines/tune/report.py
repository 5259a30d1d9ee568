"""A sweep's results read as one table: a row per trial (its swept values, status, each eval set's mIoU and the
delta against the baseline row), the table in Markdown, and a plot of the metric per swept key."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pgseg.plots import pyplot
from pipelines.tune.spec import SEED, SweepSpec, trial_label
from pipelines.tune.trial import TrialSetup


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


def display_name(measure: str) -> str:
    parts = measure.split("/")
    return f"{parts[1]} mIoU" if len(parts) == 3 and parts[0] == "eval" and parts[2] == "mIoU" else measure


def scaled(measure: str, value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return value  # missing, or diverged (shown as nan / inf)
    return round(100 * value, 2) if measure.endswith("mIoU") else round(value, 4)


def summary_table(spec: SweepSpec, rows: list[TrialRow], eval_sets: list[str]) -> list[dict[str, Any]]:
    """One row per trial (the paper's Tables 4 and 5): the swept values, status, each eval set's mIoU in % and its
    delta against the baseline row (with variants: the baseline variant at the same grid point; else the first
    trial), the metric's best value."""
    grid = sorted(k for k, v in spec.space.items() if "grid" in v) + ([SEED] if spec.seeds else [])
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
        if spec.seeds:
            line[SEED] = row.values.get(SEED)
        line.update({"status": row.status, "steps": f"{row.step}/{row.total_steps}"})
        for measure in shown:
            value = scaled(measure, row.last.get(measure))
            ref = scaled(measure, base.last.get(measure)) if base is not None else None
            line[display_name(measure)] = value
            line[f"Δ {display_name(measure)}"] = round(value - ref, 2 if measure.endswith("mIoU") else 4) \
                if value is not None and ref is not None and math.isfinite(value - ref) else None
        line[f"best {display_name(spec.metric)}"] = scaled(spec.metric, row.best)
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
    plt = pyplot()
    done = [r for r in rows if spec.metric in r.last]
    xs = [r.variant if key == "variant" else r.values.get(key) for r in done]
    ys = [scaled(spec.metric, r.last[spec.metric]) for r in done]
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
    return save_plot(spec, fig, ax, f"{spec.name}: {display_name(spec.metric)} (last value) by {key}", path)


def save_plot(spec: SweepSpec, fig: Any, ax: Any, title: str, path: Path) -> Path:
    """The sweep metric on the y axis, the title, a grid; written to ``path`` (PNG) and closed."""
    plt = pyplot()
    ax.set_ylabel(display_name(spec.metric) + (" (%)" if spec.metric.endswith("mIoU") else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def trial_rows(spec: SweepSpec, setup: TrialSetup, results: Any) -> list[TrialRow]:
    """The rows of Tune's results, in the order of the sweep's trials (variant × grid point)."""
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
    order = {label: i for i, (label, _) in enumerate(spec.trial_values())}
    listed = [k for k in spec.space if "grid" in spec.space[k]] + ([SEED] if spec.seeds else [])
    return sorted(rows, key=lambda r: (order.get(trial_label(r.variant, {k: r.values[k] for k in listed}), 0),
                                       r.trial_id))
