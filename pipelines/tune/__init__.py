"""Ray Tune sweeps: ``pgseg sweep --config SWEEP.yaml`` — the paper's ablations (Tables 4 and 5, the threshold phi,
the weights lambda and beta, the released code's quirks) as many training runs, read as one table.

``spec`` (the sweep file, checked whole before anything runs), ``trial`` (the Tune function trainable around
``pipelines.train.fit``), ``report`` (the summary table and plots), ``run`` (the driver: Tuner, resume, MLflow).
"""
from .report import TrialRow, markdown, summary_table
from .run import SweepInterrupted, SweepResult, run_sweep
from .spec import SweepSpec, load_sweep

__all__ = ["SweepInterrupted", "SweepResult", "SweepSpec", "TrialRow", "load_sweep", "markdown", "run_sweep",
           "summary_table"]
