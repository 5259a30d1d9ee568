"""`pgseg analyze` on a model trained by the real pipeline and the shapes world's VOC-format val set, logged to a
real MLflow server: its mIoU is the evaluation's, its oracle mIoU is at least that, its counts are the model's."""
from __future__ import annotations

import json

import pytest


def test_analyze_reports_grouping_apart_from_naming(trained_tiny, shapes_data, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.analyze import main
    from pgseg.checkpoint import load_model
    from pgseg.datasets import voc
    from pgseg.evaluate import evaluate_in_process
    from pgseg.segment import ProtocolSettings, background_threshold

    out = tmp_path / "analysis"
    assert main([str(trained_tiny), "--data", str(shapes_data["val"]), "--out", str(out), "--image-size", "128",
                 "--track", mlflow_server]) == 0
    printed = capsys.readouterr().out
    name = voc(shapes_data["val"]).name
    figures = json.loads((out / name / "analysis.json").read_text())
    model, config = load_model(trained_tiny)
    dataset = voc(shapes_data["val"])
    settings = ProtocolSettings.of(config.eval, background_threshold(None, config.eval, dataset.bg_thresh))
    scores, _ = evaluate_in_process(model, dataset, settings)
    assert figures["miou"] == pytest.approx(scores.miou, abs=1e-9)  # the protocol's own figure
    # one window per image: the model names each group as a whole, and the majority class is the naming of the same
    # groups that gets the most pixels right
    assert figures["oracle_aacc"] >= figures["aacc"]
    assert figures["naming_gap"] == pytest.approx(figures["oracle_miou"] - figures["miou"])
    assert figures["images"] == len(dataset) and figures["groups"] >= len(dataset)  # a group per image at least
    assert figures["cost"]["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert figures["cost"]["image_size"] == 128
    assert figures["richness"]["effective_dims"] >= 1.0
    assert len(figures["richness"]["variances"]) == config.model.output_dim
    assert f"oracle-group mIoU {100 * figures['oracle_miou']:.2f}" in printed
    assert (out / name / "richness.png").read_bytes()[:4] == b"\x89PNG"
    run_id = printed.strip().splitlines()[-1].split()[-1]
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.data.metrics[f"analyze/{name}/oracle_mIoU"] == pytest.approx(figures["oracle_miou"])
    assert run.data.metrics[f"analyze/{name}/params"] == figures["cost"]["params"]["total"]
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run_id, "analyze")}
    assert f"analyze/{name}_richness.png" in artifacts and f"analyze/{name}_analysis.json" in artifacts
    # FLOPs grow with the image (the patch grid), the text side does not
    small = json.loads((out / name / "analysis.json").read_text())["cost"]["gflops"]
    from pgseg.analyze import model_cost

    at64 = model_cost(model, 64).gflops
    assert at64["image"] < small["image"] and at64["text"] == small["text"]
    patch = config.model.image.patch_size
    stem = 2 * config.model.image.embed_dim * 3 * patch ** 2 * (64 // patch) ** 2  # the patch embedding's convolution
    assert at64["image"] * 1e9 > stem


def test_analyze_refuses_bad_input_and_keeps_what_is_there(trained_tiny, shapes_data, tmp_path, capsys):
    from jobs.analyze import main

    assert main([str(trained_tiny), "--data", str(tmp_path / "nowhere"), "--no-track"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.safetensors"), "--data", str(shapes_data["val"]), "--no-track"]) == 2
    assert "no such model file" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main([str(trained_tiny), "--data", str(shapes_data["val"]), "--out", str(out), "--no-track",
                 "--max-images", "2"]) == 0
    capsys.readouterr()
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([str(trained_tiny), "--data", str(shapes_data["val"]), "--out", str(out), "--no-track"]) == 2
    assert "add --overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written
    assert main([str(trained_tiny), "--data", str(shapes_data["val"]), "--no-track", "--max-images", "0"]) == 2
