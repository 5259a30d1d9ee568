"""AdamW with the parameter groups of SPEC §4 and the per-step warm-up/cosine schedule of the released recipe."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler

from ..config import Config


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of SPEC §4: no weight decay on 1-D (and 0-D) parameters and on biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class Rates:
    """The learning rates of a run at its global batch: ``optim.lr``, ``schedule.warmup_lr`` and ``min_lr`` are given
    for ``optim.batch_ref`` images and scaled by ``factor`` (GroupViT: linear in the global batch over 4096)."""

    factor: float
    lr: float
    warmup_lr: float
    min_lr: float


def scaled_rates(config: Config, global_batch: int) -> Rates:
    o, s = config.optim, config.schedule
    ratio = global_batch / o.batch_ref
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[o.lr_scaling]
    return Rates(factor, o.lr * factor, s.warmup_lr * factor, s.min_lr * factor)


def warmup_steps(config: Config, steps_per_epoch: int) -> int:
    """The warm-up's length in steps (``schedule.warmup_epochs`` is in epochs, i.e. samples)."""
    return round(config.schedule.warmup_epochs * steps_per_epoch)


def build_optimizer(model: torch.nn.Module, config: Config, global_batch: int) -> torch.optim.Optimizer:
    o = config.optim
    # one fused kernel for all parameters (on a CPU several times faster than the per-parameter loop: benchmarks.step)
    fused = True if next(model.parameters()).device.type in ("cpu", "cuda") else None
    return torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=scaled_rates(config, global_batch).lr,
                             betas=tuple(o.betas), eps=o.eps, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int,
                    global_batch: int) -> CosineLRScheduler:
    """timm's cosine schedule, per step: linear warm-up from ``warmup_lr``, cosine to ``min_lr`` counted from step 0
    (the released recipe's timing). The warm-up and the run are given in epochs, so in samples: a larger global
    batch has fewer steps per epoch and the same schedule per sample."""
    s, rates = config.schedule, scaled_rates(config, global_batch)
    return CosineLRScheduler(optimizer, t_initial=s.epochs * steps_per_epoch, lr_min=rates.min_lr,
                             warmup_t=warmup_steps(config, steps_per_epoch), warmup_lr_init=rates.warmup_lr,
                             t_in_epochs=False)


def learning_rate(config: Config, steps_per_epoch: int, step: int, global_batch: int) -> float:
    """The learning rate the schedule gives at ``step`` (for reports and tests)."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=scaled_rates(config, global_batch).lr)
    scheduler = build_scheduler(probe, config, steps_per_epoch, global_batch)
    scheduler.step_update(step)
    return probe.param_groups[0]["lr"]
