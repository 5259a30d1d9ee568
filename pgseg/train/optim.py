"""AdamW with the parameter groups of SPEC §4 and the per-step warm-up/cosine schedule of the released recipe."""
from __future__ import annotations

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


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    o = config.optim
    return torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int) -> CosineLRScheduler:
    """timm's cosine schedule, per step: linear warm-up from ``warmup_lr``, cosine to ``min_lr`` counted from step 0
    (the released recipe's timing)."""
    s = config.schedule
    return CosineLRScheduler(optimizer, t_initial=s.epochs * steps_per_epoch, lr_min=s.min_lr,
                             warmup_t=round(s.warmup_epochs * steps_per_epoch), warmup_lr_init=s.warmup_lr,
                             t_in_epochs=False)


def learning_rate(config: Config, steps_per_epoch: int, step: int) -> float:
    """The learning rate the schedule gives at ``step`` (for reports and tests)."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.optim.lr)
    scheduler = build_scheduler(probe, config, steps_per_epoch)
    scheduler.step_update(step)
    return probe.param_groups[0]["lr"]
