"""Workflows (``pgseg run``): an experiment file's stages chained in one working folder, each skipped when its
manifest says it is done — ``experiment`` (the file, typed), ``manifest`` (what a finished stage records), ``stages``
(the four stage runners), ``run`` (the driver and its MLflow run)."""
from .experiment import Experiment, load_experiment, train_section, training_config
from .run import WorkflowError, WorkflowResult, run_workflow

__all__ = ["Experiment", "WorkflowError", "WorkflowResult", "load_experiment", "run_workflow", "train_section",
           "training_config"]
