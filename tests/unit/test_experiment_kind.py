"""Our MLflow experiments are model-training ones (MLflow 3's experiment kind), so its UI opens them on the runs
table and charts instead of the GenAI traces view; a real sqlite tracking store."""
from mlflow.tracking import MlflowClient

from pipelines.tracking import KIND_TAG, MODEL_TRAINING, Tracker


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
