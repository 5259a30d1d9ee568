"""Our MLflow experiments are model-training ones (MLflow 3's experiment kind), and our links into MLflow's UI name
its model-training view (3.17's UI chooses the view by a switch of its own, not by the kind: the browser test,
tests/integration/test_dashboard.py, opens them); a real sqlite tracking store."""
from mlflow.tracking import MlflowClient

from pipelines.tracking import KIND_TAG, MODEL_TRAINING, UI_VIEW, Tracker, ui_link


def test_experiments_are_created_or_marked_as_model_training_and_a_set_kind_stays(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker, client = Tracker(uri), MlflowClient(uri)
    created = tracker.experiment_id("fresh")
    assert client.get_experiment(created).tags[KIND_TAG] == MODEL_TRAINING
    older = client.create_experiment("made-before")  # e.g. by an earlier version: no kind
    assert KIND_TAG not in client.get_experiment(older).tags
    tracker.create_run("made-before", "a run")
    assert client.get_experiment(older).tags[KIND_TAG] == MODEL_TRAINING
    chosen = client.create_experiment("someone's", tags={KIND_TAG: "genai_development"})
    assert tracker.experiment_id("someone's") == chosen
    assert client.get_experiment(chosen).tags[KIND_TAG] == "genai_development"


def test_links_name_the_model_training_view():
    assert ui_link("http://127.0.0.1:5000/", "3") == f"http://127.0.0.1:5000/#/experiments/3?{UI_VIEW}"
    run_page = ui_link("http://127.0.0.1:5000", "3", "abc", "model-metrics")
    assert run_page == f"http://127.0.0.1:5000/#/experiments/3/runs/abc/model-metrics?{UI_VIEW}"
    assert UI_VIEW == "workflowType=machine_learning"
