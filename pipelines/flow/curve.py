"""The learning curve of a training run, drawn from what it logged to MLflow: the training loss, and for its first
dev set the protocol's mIoU and, when scored, the oracle-group mIoU (grouping apart from naming), against steps."""
from __future__ import annotations

import io
from pathlib import Path

from pgseg.fileio import atomic_write_bytes
from pgseg.plots import pyplot
from pipelines.tracking import Tracker


def learning_curve(tracker: Tracker, run_id: str, dev_set: str | None, path: Path) -> Path | None:
    """Draw the run's curve into ``path`` (PNG) and log it to the run as ``learning_curve.png``; None when the run
    logged no loss."""
    plt = pyplot()
    loss = tracker.history(run_id, "loss")
    if not loss:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*loss), color="grey", lw=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if dev_set:
        right = ax.twinx()
        for key, label, colour in ((f"eval/{dev_set}/mIoU", f"{dev_set} mIoU", "C0"),
                                   (f"eval/{dev_set}/oracle_mIoU", f"{dev_set} oracle-group mIoU", "C1")):
            points = tracker.history(run_id, key)
            if points:
                steps, values = zip(*points)
                right.plot(steps, [100 * v for v in values], marker=".", color=colour, label=label)
        right.set_ylabel("mIoU (%)")
        lines = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        right.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    ax.set_title("learning curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    tracker.log_artifact(run_id, path)
    return path
