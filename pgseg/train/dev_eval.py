"""Evaluation during training (rank 0, in process): the zero-shot mIoU of a frozen copy of the model on each of
``eval.datasets``; when the first one's mIoU beats the best so far, that model is written to a file."""
from __future__ import annotations

import copy

import torch

from ..checkpoint import save_model
from ..config import Config
from ..datasets import open_dataset
from ..distributed import SINGLE
from ..evaluate import evaluate_in_process
from ..segment import ProtocolSettings, background_threshold


class DevEvaluation:
    def __init__(self, config: Config, best_path: str | None):
        e = config.eval
        self.config, self.best_path = config, best_path
        self.datasets = [open_dataset(spec) for spec in e.datasets]
        self.settings = [ProtocolSettings.of(e, background_threshold(None, e, d.bg_thresh)) for d in self.datasets]

    def __call__(self, model: torch.nn.Module, best: float) -> tuple[dict[str, float], float]:
        """(``eval/<set>/mIoU`` of each set and ``eval/best_mIoU``, the new best)."""
        frozen = copy.deepcopy(model).eval()  # nothing of the training model changes (buffers included)
        frozen.world = SINGLE  # this rank alone: no collective while the others wait
        out: dict[str, float] = {}
        with torch.no_grad():
            for i, (dataset, settings) in enumerate(zip(self.datasets, self.settings)):
                scores, _ = evaluate_in_process(frozen, dataset, settings)
                out[f"eval/{dataset.name}/mIoU"] = scores.miou
                if i == 0:
                    out["eval/best_mIoU"] = max(best, scores.miou)
                    if scores.miou > best:
                        best = scores.miou
                        if self.best_path:
                            save_model(frozen, self.config, self.best_path)
        return out, best
