"""`pgseg eval` end to end on Ray: a trained tiny model on the shapes world's VOC-format validation set; the table
it prints is the table it logs to a real MLflow server."""
from __future__ import annotations

import re

import numpy as np
import pytest


def test_eval_prints_the_table_it_logs_to_mlflow(ray_local, trained_tiny, shapes_data, mlflow_server, capsys,
                                                 tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from jobs.evaluate import main

    args = ["--checkpoint", str(trained_tiny), "--dataset", f"voc:{shapes_data['val']}", "--track", mlflow_server,
            "--overlays", "4", "--out", str(tmp_path / "eval")]
    assert main(args) == 0
    out = capsys.readouterr().out
    name = shapes_data["val"].name
    # --out: the same table, the figures, and image | ground truth | prediction for the first 4 images
    assert (tmp_path / "eval" / f"{name}.md").read_text().strip() in out
    figures = __import__("json").loads((tmp_path / "eval" / f"{name}.json").read_text())
    drawn = sorted((tmp_path / "eval" / name).glob("*.png"))
    assert len(drawn) == 4 and figures["images"] == 8
    image_width = Image.open(next((shapes_data["val"] / "JPEGImages").glob("*.jpg"))).width
    assert Image.open(drawn[0]).width >= 3 * max(image_width, 192)  # three panels (small images drawn at 192 px)
    assert main(args) == 2  # the results are there: not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    miou = float(re.search(r"mIoU ([0-9.]+)", out).group(1))
    run_id = re.search(r"logged to MLflow run (\w+)", out).group(1)
    client = MlflowClient(mlflow_server)
    logged = client.get_run(run_id).data.metrics[f"eval/{name}/mIoU"]
    assert round(100 * logged, 2) == miou
    printed = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)\s+([0-9.]+|nan)\s+[0-9.na]+$", out, re.M)}
    import json
    import tempfile

    folder = client.download_artifacts(run_id, f"eval/{name}_iou.json", tempfile.mkdtemp())
    table = json.load(open(folder))
    rows = dict(zip([r[0] for r in table["data"]], [r[1] for r in table["data"]]))
    assert set(rows) == {"background", *shapes_data["world"].classes}
    for cls, iou in rows.items():
        assert printed[cls] == pytest.approx(round(100 * iou, 2), abs=0.006) or (np.isnan(iou) and np.isnan(printed[cls]))
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert f"eval/{name}_overlays.png" in artifacts and f"eval/{name}_iou.md" in artifacts
    # the mIoU is the mean of the per-class IoUs it shows
    assert miou == pytest.approx(100 * np.nanmean(list(rows.values())), abs=0.01)


def test_eval_names_a_bad_mask_and_logs_nothing(ray_local, trained_tiny, shapes_data, mlflow_server, tmp_path, capsys):
    import shutil

    from mlflow.tracking import MlflowClient
    from PIL import Image

    from jobs.evaluate import main
    from pgseg.visualize import PALETTE

    root = tmp_path / "val"
    shutil.copytree(shapes_data["val"], root)
    bad = sorted((root / "SegmentationClass").glob("*.png"))[3]
    mask = np.array(Image.open(bad))
    mask[:4, :4] = 17  # not a class of this 5-class set, not 255
    poisoned = Image.fromarray(mask, mode="P")
    poisoned.putpalette(PALETTE)
    poisoned.save(bad)
    experiments_before = {e.name for e in MlflowClient(mlflow_server).search_experiments()}
    runs_before = len(MlflowClient(mlflow_server).search_runs(
        [e.experiment_id for e in MlflowClient(mlflow_server).search_experiments()]))
    rc = main(["--checkpoint", str(trained_tiny), "--dataset", f"voc:{root}", "--track", mlflow_server])
    err = capsys.readouterr().err
    assert rc == 2
    assert bad.name in err and "17" in err
    client = MlflowClient(mlflow_server)
    assert {e.name for e in client.search_experiments()} == experiments_before
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before


def _val_samples(shapes_data):
    from pgseg.datasets import open_dataset

    return open_dataset(f"voc:{shapes_data['val']}")


@pytest.mark.parametrize("true_labels", [False, True], ids=["protocol", "true_label_guidance"])
def test_the_ray_data_evaluation_gives_the_in_process_figures(ray_local, trained_tiny, shapes_data, true_labels):
    """The cluster path (actors, batches, counts sent back as bytes) and the in-process path (training's dev
    evaluation) add up the same confusion counts: equal per-class IoU, mIoU and all-background baseline."""
    from pgseg.checkpoint import load_model
    from pgseg.evaluate import evaluate_in_process
    from pgseg.segment import ProtocolSettings
    from pipelines.evaluate import evaluate

    dataset = _val_samples(shapes_data)
    settings = ProtocolSettings(bg_thresh=0.5)
    on_ray = evaluate(str(trained_tiny), dataset, settings, overlays=0, true_labels=true_labels, progress=False)
    scores, baseline = evaluate_in_process(load_model(trained_tiny)[0], dataset, settings, true_labels)
    assert on_ray.images == len(dataset) == 8
    assert np.array_equal(np.array(on_ray.scores.iou), np.array(scores.iou), equal_nan=True)
    assert on_ray.scores.miou == scores.miou and on_ray.baseline_miou == baseline
    if not true_labels:  # two sets through one pool of actors, 3 images a batch (a batch holds rows of both sets)
        from pipelines.evaluate import evaluate_many

        plain = ProtocolSettings(bg_thresh=None)
        both = evaluate_many(str(trained_tiny), [(dataset, settings), (dataset, plain)], overlays=0, progress=False,
                             images_per_batch=3)
        alone, _ = evaluate_in_process(load_model(trained_tiny)[0], dataset, plain)
        assert [r.images for r in both] == [8, 8]
        assert both[0].scores.miou == scores.miou and both[1].scores.miou == alone.miou
        assert both[1].settings == plain and np.isnan(both[1].baseline_miou)


def test_true_label_guidance_keeps_only_the_classes_of_the_ground_truth(trained_tiny, shapes_data, tmp_path):
    """Each image scored twice against a ground truth that names background and one class the model did not
    predict unguided: guided, the prediction keeps to those two; unguided, it named another class there (so the
    guidance had something to take away, whatever this training run learned)."""
    from PIL import Image

    from pgseg.checkpoint import load_model
    from pgseg.evaluate import dataset_segmenter, score_sample
    from pgseg.segment import ProtocolSettings
    from pgseg.visualize import PALETTE

    dataset = _val_samples(shapes_data)
    classes = len(dataset.class_names)
    # threshold 0: no pixel falls to background, so the model names classes on every image (a tiny model's scores
    # may all stay under a higher threshold)
    segmenter = dataset_segmenter(load_model(trained_tiny)[0], dataset.class_names, ProtocolSettings(bg_thresh=0.0))
    restricted = 0
    for sample in dataset:
        *_, unguided, _, target = score_sample(segmenter, str(sample.image), str(sample.mask), classes,
                                               dataset.reader, False)
        named = set(np.unique(unguided).tolist()) - {0}
        kept = min(set(range(1, classes)) - named, default=None)
        if kept is None:
            continue
        truth = np.where(target == 255, 255, 0).astype(np.uint8)
        truth[: truth.shape[0] // 4, : truth.shape[1] // 4] = kept
        mask = tmp_path / f"{sample.id}.png"
        drawn = Image.fromarray(truth, mode="P")
        drawn.putpalette(PALETTE)
        drawn.save(mask)
        *_, guided, _, _ = score_sample(segmenter, str(sample.image), str(mask), classes, dataset.reader, True)
        assert set(np.unique(guided).tolist()) <= {0, kept}, (sample.id, kept)
        restricted += 1
    assert restricted > 0, "the model named every class on every validation image: nothing left to guide"
