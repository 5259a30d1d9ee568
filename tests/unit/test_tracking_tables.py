"""A table logged again at the same path replaces the earlier one (MLflow's own log_table appends its rows), and
MLflow's UI is told it is a table once; a real sqlite tracking store."""
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking import Tracker


def _table(client: MlflowClient, run_id: str, path: str) -> list[dict]:
    table = json.loads(Path(client.download_artifacts(run_id, path)).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_a_table_logged_again_replaces_the_first_and_is_marked_as_a_table_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker, client = Tracker(uri), MlflowClient(uri)
    run_id = tracker.create_run("tables", "sweep")
    tracker.log_table(run_id, [{"trial": "a", "miou": 50.0}, {"trial": "b", "miou": float("nan")}], "summary.json")
    tracker.log_table(run_id, {"trial": ["a", "b"], "miou": [50.0, 61.5]}, "summary.json")
    tracker.log_table(run_id, {"class": ["circle"], "iou": [0.7]}, "analyze/val_classes.json")
    assert _table(client, run_id, "summary.json") == [{"trial": "a", "miou": 50.0}, {"trial": "b", "miou": 61.5}]
    assert _table(client, run_id, "analyze/val_classes.json") == [{"class": "circle", "iou": 0.7}]
    tags = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert tags == [{"path": "summary.json", "type": "table"}, {"path": "analyze/val_classes.json", "type": "table"}]
    with pytest.raises(ValueError, match="must end in .json"):
        tracker.log_table(run_id, {"a": [1]}, "summary.csv")
