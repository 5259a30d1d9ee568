"""One rank's training step: the model, AdamW, the schedule and the gradient scaler, and what one batch does to
them — forward (under autocast), backward, a finite-loss check agreed by every rank, clipping, the optimiser step
and the prototype EMA. Plain PyTorch: a DDP wrapper and the collectives are handed in once, at construction."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..checkpoint import init_from_checkpoint
from ..config import Config
from ..distributed import SINGLE, Collectives
from ..model import PGSeg
from .optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# wraps the model for data parallelism (e.g. DistributedDataParallel); receives DDP's keyword arguments
Wrap = Callable[..., torch.nn.Module]


@dataclass
class StepResult:
    """What a step gives back. The loss values and the gradient norm stay on the device until read (``losses``,
    ``grad_norm``): a loop that logs every few steps waits for the device once per step only, for ``finite``."""

    names: list[str]  # "loss" and each "loss/<term>"
    values: torch.Tensor  # [len(names)], averaged over ranks
    metrics: dict[str, torch.Tensor]  # the model's detached scalars (this rank)
    norm: torch.Tensor | None  # the gradient norm before clipping (None: a skipped step)
    finite: bool
    seconds: dict[str, float]  # "time/compute" (forward + backward), "time/optim"

    @property
    def losses(self) -> dict[str, float]:
        return dict(zip(self.names, self.values.tolist()))

    @property
    def grad_norm(self) -> float:
        return float("nan") if self.norm is None else float(self.norm)


def step_precision(precision: str, device: torch.device) -> str:
    """fp32, bf16 or fp16: what ``train.precision`` means on ``device`` (auto: bf16 autocast on a GPU that has it,
    fp16 with the gradient scaler on one that has not, fp32 elsewhere)."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class TrainStep:
    """Build once per rank; call once per batch (``{"image": [B,3,S,S], "tokens": [B,L], "nouns": [B,K,L]?,
    "noun_ids": [B,K]?}``).

    ``world``: this rank's collectives (the losses' global batch, the prototype EMA); ``wrap``: the DDP wrapper of a
    multi-process run; ``init``: load ``train.init_from`` (off when a checkpoint is restored instead).
    """

    def __init__(self, config: Config, steps_per_epoch: int, device: torch.device | str = "cpu", *,
                 world: Collectives = SINGLE, init: bool = True, wrap: Wrap | None = None):
        self.config, self.steps_per_epoch, self.device, self.world = config, steps_per_epoch, torch.device(device), world
        t = config.train
        torch.manual_seed(t.seed)  # the same initial model on every rank (DDP also broadcasts rank 0's)
        model = PGSeg.from_config(config, world)
        if init and t.init_from:
            report = init_from_checkpoint(model, t.init_from)
            if world.rank == 0:
                log.info("initialised from %s:\n%s", t.init_from, report.text())
        if t.use_gpu and world.world > 1:  # batch statistics of the projectors over the global batch (CUDA only)
            model.sync_batchnorm()
        self.model = model.to(self.device)
        if t.compile:
            self.model.compile_encoders()
        self.optimizer = build_optimizer(self.model, config, self.global_batch)
        self.scheduler = build_scheduler(self.optimizer, config, steps_per_epoch, self.global_batch)
        self.precision = step_precision(t.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        torch.manual_seed(t.seed * 1000 + world.rank)  # Gumbel noise and dropout differ across ranks
        npr = config.npr.resolved()
        delayed = npr.enabled and (npr.start_epoch > 0 or npr.start_step > 0)  # the graph grows when NPR starts
        self.net = wrap(self.model, find_unused_parameters=delayed) if wrap else self.model

    @property
    def global_batch(self) -> int:
        """The images one step compares against: every rank's batch."""
        return self.config.rank_batch(self.world.world) * self.world.world

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def __call__(self, batch: dict[str, torch.Tensor], step: int, *, poison: bool = False) -> StepResult:
        """Train on ``batch`` as step ``step`` (the schedule and NPR's start follow it). ``poison``: a NaN loss
        (the fault drill of a diverged step)."""
        t0 = time.perf_counter()
        self.net.train()
        self.scheduler.step_update(step)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.net(batch["image"], batch["tokens"], batch.get("nouns"), noun_ids=batch.get("noun_ids"),
                           step=step, epoch=step // self.steps_per_epoch)
        loss = out.loss * float("nan") if poison else out.loss
        self.scaler.scale(loss).backward()
        t1 = time.perf_counter()
        terms = [v.detach().float() for v in out.terms.values()]
        losses = self.world.mean(torch.stack([loss.detach().float(), *terms]))
        finite = bool(torch.isfinite(losses[0]))  # the same on every rank: the mean over ranks (the step's one wait)
        grad_norm = None
        if finite:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip or math.inf)
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # the prototypes move with the weights: not when fp16's scaler skipped the step (it lowers its scale)
            if scale is None or self.scaler.get_scale() >= scale:
                self.model.ema_step(out.prototypes)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(["loss", *(f"loss/{k}" for k in out.terms)], losses, out.metrics, grad_norm, finite,
                          {"time/compute": t1 - t0, "time/optim": time.perf_counter() - t1})
