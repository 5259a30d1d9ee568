"""The MLflow UI, opened in a real headless Chromium as our users would, on the session's tracked training run (a
real `mlflow server` on 127.0.0.1): the link we print lands on the runs table, not on MLflow 3's GenAI traces
overview; the run's loss and mIoU curves are charts; an evaluation's per-class IoU table is shown as a table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_the_mlflow_ui_shows_our_runs_curves_and_miou_table(tiny_run, trained_tiny, shapes_data, mlflow_server,
                                                             tmp_path):
    from browser import open_browser, page_text, screenshot, wait_until
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from pgseg.checkpoint import load_model
    from pgseg.datasets import voc
    from pgseg.evaluate import EvalResult, evaluate_in_process
    from pgseg.segment import ProtocolSettings
    from pipelines.tracking import KIND_TAG, MODEL_TRAINING, log_eval, ui_link

    result, _ = tiny_run
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[KIND_TAG] == MODEL_TRAINING
    assert "loss" in run.data.metrics
    loss, miou = "loss", next(k for k in sorted(run.data.metrics) if k.endswith("/mIoU") and "best" not in k)

    # an evaluation logged the way the workflow's evaluate stage logs one (here into a run of its own)
    model, config = load_model(trained_tiny)
    dataset = voc(shapes_data["val"])
    settings = ProtocolSettings.of(config.eval, 0.0)
    scores, baseline = evaluate_in_process(model, dataset, settings)
    evaluated = log_eval(EvalResult(dataset.name, scores, settings, len(dataset), baseline_miou=baseline),
                         mlflow_server, experiment="tiny-evaluations", run_name="eval-tiny")
    table_path = f"eval/{dataset.name}_iou.json"
    table = json.loads(Path(client.download_artifacts(evaluated, table_path, str(tmp_path))).read_text())
    classes = [row[table["columns"].index("class")] for row in table["data"]]
    assert classes == [row["class"] for row in scores.table()] and len(classes) >= 2

    page = open_browser(height=2000)  # the filtered charts all in view
    try:
        page.get(ui_link(mlflow_server, experiment.experiment_id))
        wait_until(lambda: run.info.run_name in page_text(page) and "matching run" in page_text(page), 90,
                   "the runs table with the training run", page)
        text = page_text(page)
        assert "Run Name" in text and "Token Usage" not in text  # the runs table, not the GenAI overview
        screenshot(page, "mlflow-runs.png", tmp_path)

        page.get(ui_link(mlflow_server, experiment.experiment_id, result.run_id, "model-metrics"))
        search = wait_until(lambda: page.find_elements(By.CSS_SELECTOR, "input[placeholder='Search metric charts']"),
                            90, "the charts' search box", page)[0]
        for key in (loss, miou):  # (charts are drawn when in view: the search brings a chart to the top)
            search.send_keys(Keys.CONTROL, "a")
            search.send_keys(Keys.DELETE)
            search.send_keys(key.rsplit("/", 1)[-1])
            wait_until(lambda: f"{run.info.run_name} ({key})" in page_text(page), 90, f"the chart of {key}", page)
        screenshot(page, "mlflow-charts.png", tmp_path)

        page.get(ui_link(mlflow_server, client.get_run(evaluated).info.experiment_id, evaluated,
                         f"artifacts/{table_path}"))
        wait_until(lambda: all(name in page_text(page) for name in classes), 90, "the per-class IoU table", page)
        lines = page_text(page).split("\n")
        assert "View as table" in lines
        start = lines.index("accuracy") + 1  # the header (class, iou, accuracy), then one cell per line
        assert lines[start - 3:start] == table["columns"]
        shown = [lines[start + 3 * i:start + 3 * i + 3] for i in range(len(table["data"]))]
        assert [row[0] for row in shown] == classes
        assert [float(v) for row in shown for v in row[1:]] == pytest.approx(
            [v for row in table["data"] for v in row[1:]], rel=1e-8, abs=1e-9, nan_ok=True)  # the figures, as logged
        screenshot(page, "mlflow-miou-table.png", tmp_path)
    finally:
        page.quit()
