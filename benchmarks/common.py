"""Helpers shared by the benchmarks: the project's training step (``pgseg.train.TrainStep``: forward, backward,
clipping, AdamW with its schedule, prototype EMA) on a fixed batch, and timing."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from pgseg.config import load_config
from pgseg.model import PGSeg
from pgseg.text import tokenize
from pgseg.train import TrainStep

CAPTIONS = ["a dog running on the beach", "two people riding bikes", "a bowl of fruit on a table",
            "an aerial view of a city", "a red bus on a street", "a cat sleeping on a sofa",
            "mountains covered in snow", "a plate of pasta"]


def training_step(preset: str, batch: int, overrides: tuple[str, ...] = (), device: torch.device | str = "cpu",
                  precision: str = "fp32") -> tuple[Callable[[], None], PGSeg, dict[str, torch.Tensor]]:
    """A closure running one full training step of ``preset`` on a fixed random batch (``precision`` bf16 or fp16:
    the forward under autocast, as the trainer runs it); NPR on from the first step."""
    config = load_config(preset, [*overrides, f"train.precision={precision}", "train.use_gpu=false",
                                  "npr.start_epoch=0", "npr.start_step=0", f"data.batch_size={batch}"])
    device = torch.device(device)
    trainer = TrainStep(config, steps_per_epoch=1_000_000, device=device, init=False)
    size = config.model.image.img_size
    data = {"image": torch.randn(batch, 3, size, size, device=device),
            "tokens": tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)],
                               config.model.text.context_length).to(device)}
    count = iter(range(1_000_000))

    def step() -> None:
        trainer(data, next(count))

    return step, trainer.model, data


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)
