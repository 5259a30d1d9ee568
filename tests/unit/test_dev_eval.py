"""Evaluation during training: the sets of ``eval.datasets`` at every evaluation, those of ``eval.final_datasets``
only when the final model is scored; only the first of ``eval.datasets`` picks the best model."""
from __future__ import annotations

import pytest
import torch

from pgseg.checkpoint import model_step
from pgseg.config import ConfigError, load_config
from pgseg.datasets import open_dataset
from pgseg.evaluate import confusion_in_process
from pgseg.model import PGSeg
from pgseg.segment import ProtocolSettings, background_threshold
from pgseg.train.dev_eval import DevEvaluation
from pipelines.data.shapes_world import ShapesWorld, write_voc_val


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    world = ShapesWorld(num_classes=3, seed=4)
    return write_voc_val(world, root / "dev", 4, "dev"), write_voc_val(world, root / "last", 5, "val")


def test_final_sets_are_scored_only_on_the_final_model_and_pick_nothing(sets, tmp_path):
    dev, last = sets
    config = load_config("tiny", [f"eval.datasets=[voc:{dev}]", f"eval.final_datasets=[voc:{last}]",
                                  "eval.window=64", "eval.stride=32", "eval.short_side=64"])
    torch.manual_seed(0)
    model = PGSeg.from_config(config).eval()
    best_file = tmp_path / "best.safetensors"
    scorer = DevEvaluation(config, str(best_file))
    during, best = scorer(model, float("-inf"), step=7)
    assert set(during) == {"eval/dev/mIoU", "eval/best_mIoU"} and best == during["eval/dev/mIoU"]
    assert best_file.is_file() and model_step(best_file) == 7  # the best model's file says when it was taken
    best_file.unlink()
    final, best_after = scorer(model, best + 1.0, final=True)  # not better than the best: nothing written
    assert set(final) == {"eval/dev/mIoU", "eval/last/mIoU", "eval/best_mIoU"} and not best_file.exists()
    assert best_after == best + 1.0 and final["eval/best_mIoU"] == best + 1.0
    dataset = open_dataset(f"voc:{last}")
    settings = ProtocolSettings.of(config.eval, background_threshold(None, config.eval, dataset.bg_thresh))
    with torch.no_grad():
        assert final["eval/last/mIoU"] == confusion_in_process(model, dataset, settings).scores().miou


def test_final_sets_alone_score_without_a_best_model(sets):
    _, last = sets
    config = load_config("tiny", [f"eval.final_datasets=[voc:{last}]", "eval.window=64", "eval.stride=32",
                                  "eval.short_side=64"])
    out, best = DevEvaluation(config, None)(PGSeg.from_config(config).eval(), float("-inf"), final=True)
    assert set(out) == {"eval/last/mIoU"} and best == float("-inf")


def test_a_final_set_must_name_its_kind():
    with pytest.raises(ConfigError, match=r"eval.final_datasets\[0\]: expected KIND:ROOT"):
        load_config("tiny", ["eval.final_datasets=[somewhere]"])
