"""The training core in plain PyTorch: the optimiser and its schedule, one training step (forward, loss, backward,
clipping, scaler, optimiser, prototype EMA), the training state a run saves and resumes from, and the evaluation
on a held-out set during training. The Ray Train loop (``pipelines.train``) and the benchmarks run this same step.
"""
from .dev_eval import DevEvaluation
from .optim import Rates, build_optimizer, build_scheduler, learning_rate, parameter_groups, scaled_rates, warmup_steps
from .state import RANK_FILE, STATE_FILE, export_model, load_state, rng_state, save_state, set_rng_state, state_digests
from .step import StepResult, TrainStep

__all__ = ["DevEvaluation", "RANK_FILE", "Rates", "STATE_FILE", "StepResult", "TrainStep", "build_optimizer",
           "build_scheduler", "export_model", "learning_rate", "load_state", "parameter_groups", "rng_state",
           "save_state", "scaled_rates", "set_rng_state", "state_digests",
           "warmup_steps"]
