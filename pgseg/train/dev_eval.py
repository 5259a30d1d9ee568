"""Evaluation during training, by every rank: the zero-shot mIoU of a frozen copy of rank 0's model on each of
``eval.datasets`` (and, at the last step only, of ``eval.final_datasets``), each rank scoring its share of the
images and the confusion counts summed over ranks (so no rank waits in a collective while another scores the whole
set); when the first set's mIoU beats the best so far, the rank given a file writes that model to it."""
from __future__ import annotations

import copy

import torch

from ..analyze.oracle import oracle_confusion
from ..checkpoint import save_model
from ..config import Config
from ..datasets import open_dataset
from ..distributed import SINGLE, Collectives
from ..evaluate import confusion_in_process
from ..segment import ProtocolSettings, background_threshold


def frozen_replica(model: torch.nn.Module, world: Collectives = SINGLE) -> torch.nn.Module:
    """A copy of the training model in evaluation mode with rank 0's buffers, the same on every rank. DDP hands
    rank 0's buffers (the BatchNorm statistics) to every rank at the start of each forward, so after a step each rank
    holds the statistics of its own batch: scored as they are, each rank's share would be scored by another model
    than the one rank 0 writes. The copy's own collectives are off (the world of one)."""
    frozen = copy.deepcopy(model).eval()  # nothing of the training model changes (buffers included)
    with torch.no_grad():
        for buffer in frozen.buffers():
            buffer.copy_(world.broadcast(buffer))
    frozen.world = SINGLE
    return frozen


class DevEvaluation:
    def __init__(self, config: Config, best_path: str | None, world: Collectives = SINGLE):
        e = config.eval
        self.config, self.best_path, self.world = config, best_path, world
        self.datasets = [open_dataset(spec) for spec in e.datasets]
        self.final = [open_dataset(spec) for spec in e.final_datasets]
        self.settings = [ProtocolSettings.of(e, background_threshold(None, e, d.bg_thresh))
                         for d in self.datasets + self.final]

    def __call__(self, model: torch.nn.Module, best: float, final: bool = False,
                 step: int | None = None) -> tuple[dict[str, float], float]:
        """(``eval/<set>/mIoU`` of each set and ``eval/best_mIoU``, the new best): the same on every rank. ``final``:
        the last step's model, which ``eval.final_datasets`` score too; ``step``: the model's, kept in the best
        model's file."""
        frozen = frozen_replica(model, self.world)
        out: dict[str, float] = {}
        sets = self.datasets + (self.final if final else [])
        with torch.no_grad():
            for i, (dataset, settings) in enumerate(zip(sets, self.settings)):
                matrix = confusion_in_process(frozen, dataset, settings, part=(self.world.rank, self.world.world))
                matrix.matrix = self.world.total(matrix.matrix)
                scores = matrix.scores()
                out[f"eval/{dataset.name}/mIoU"] = scores.miou
                if self.config.eval.oracle:
                    oracle = oracle_confusion(frozen, dataset, settings, part=(self.world.rank, self.world.world))
                    oracle.matrix = self.world.total(oracle.matrix)
                    out[f"eval/{dataset.name}/oracle_mIoU"] = oracle.scores().miou
                if i == 0 and self.datasets:
                    out["eval/best_mIoU"] = max(best, scores.miou)
                    if scores.miou > best:
                        best = scores.miou
                        if self.best_path:
                            save_model(frozen, self.config, self.best_path, step=step)
        return out, best
