"""Distributed PGSeg training on Ray Train V2: the driver's plan (checked before Ray starts), the loop each worker
runs around ``pgseg.train.TrainStep``, and ``fit`` (one ``TorchTrainer``, checkpoints, resume, MLflow)."""
from .faults import FAULT_ENV, parse_faults
from .fit import BEST_MODEL_FILE, MODEL_FILE, TrainResult, fit
from .plan import Plan, TrainingError, plan_training

__all__ = ["BEST_MODEL_FILE", "FAULT_ENV", "MODEL_FILE", "Plan", "TrainResult", "TrainingError", "fit",
           "parse_faults", "plan_training"]
