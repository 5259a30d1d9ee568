"""Helpers shared by the benchmarks: a real training step (forward, backward, AdamW, prototype EMA) and timing."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from pgseg.config import load_config
from pgseg.model import PGSeg
from pgseg.text import tokenize

CAPTIONS = ["a dog running on the beach", "two people riding bikes", "a bowl of fruit on a table",
            "an aerial view of a city", "a red bus on a street", "a cat sleeping on a sofa",
            "mountains covered in snow", "a plate of pasta"]


def training_step(preset: str, batch: int, overrides: tuple[str, ...] = (), device: torch.device | str = "cpu",
                  precision: str = "fp32") -> tuple[Callable[[], None], PGSeg, tuple]:
    """A closure running one full training step of ``preset`` on a fixed random batch (``precision`` bf16 or fp16:
    the forward under autocast, as the trainer runs it)."""
    config = load_config(preset, list(overrides))
    device = torch.device(device)
    model = PGSeg.from_config(config).to(device).train()
    size = config.model.image.img_size
    images = torch.randn(batch, 3, size, size, device=device)
    tokens = tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], config.model.text.context_length).to(device)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(images, tokens)
        out.loss.backward()
        optimiser.step()
        model.ema_step(out.prototypes)

    return step, model, (images, tokens)


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)
