"""`pgseg run`: an experiment's stages as one workflow with manifests — a failed stage is redone (and the stages
after it) while the ones before it are skipped; a finished experiment run again skips every stage. Real parts: the
shapes world served over HTTP on 127.0.0.1, img2dataset shards, Ray Train on the local Ray, Ray Data evaluation, a
real MLflow server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


def _experiment(tmp_path: Path, uri: str | None) -> Path:
    spec = {
        "name": "wf",
        "workdir": str(tmp_path / "wf"),
        "tracking": {"uri": uri, "experiment": "wf-test"} if uri else {"enabled": False},
        "sources": {"shapes": {"world": {"num_classes": 3, "image_size": 64, "max_objects": 2, "seed": 3},
                               "train_images": 256, "val_images": 6, "dev_images": 4, "serve": "http"}},
        "download": {"image_size": 64, "number_sample_per_shard": 128, "processes_count": 1, "thread_count": 4},
        "train": {"base": "tiny", "data": {"batch_size": 16, "augment": False}, "schedule": {"epochs": 1},
                  "train": {"workers": 1, "cpus_per_worker": 0.5, "checkpoint_every": 100, "nonfinite": "stop"},
                  "tracking": {"log_every": 4}, "eval": {"every_steps": 8, "oracle": True}},
        "evaluate": {"datasets": ["shapes"], "overlays": 2},
        "analyze": {"datasets": ["shapes"], "model": "final"},
    }
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _statuses(result) -> dict[str, str]:
    return {o.stage: o.status for o in result.outcomes}


def test_failed_stage_is_redone_and_a_finished_workflow_skips_everything(ray_local, mlflow_server, tmp_path,
                                                                         monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines.flow import WorkflowError, load_experiment, run_workflow
    from pipelines.flow.manifest import read_record

    path = _experiment(tmp_path, mlflow_server)
    experiment = load_experiment(path)
    root = experiment.root
    # 1. training is made to fail (a non-finite loss at step 5 with nonfinite=stop): the stages before it are done
    monkeypatch.setenv("PGSEG_FAULT_INJECT", "nan@5")
    with pytest.raises(WorkflowError) as failure:
        run_workflow(experiment, printer=lambda _: None)
    assert failure.value.stage == "train"
    assert _statuses(failure.value.result) == {"sources": "ran", "download": "ran", "train": "failed"}
    assert read_record(root, "download") is not None and read_record(root, "train") is None
    shards_before = {p.name: p.stat().st_mtime_ns for p in (root / "shards").glob("*.tar")}
    assert len(shards_before) == 2
    # 2. run again: sources and download are skipped, training continues and evaluation runs
    monkeypatch.delenv("PGSEG_FAULT_INJECT")
    printed: list[str] = []
    second = run_workflow(experiment, printer=printed.append)
    assert _statuses(second) == {"sources": "skipped", "download": "skipped", "train": "ran", "evaluate": "ran", "analyze": "ran"}
    assert {p.name: p.stat().st_mtime_ns for p in (root / "shards").glob("*.tar")} == shards_before
    results = json.loads((root / "eval" / "results.json").read_text())
    assert set(results) == {"val"} and results["val"]["images"] == 6
    assert 0.0 <= results["val"]["miou"] <= 1.0 and 0.0 < results["val"]["all_background_miou"] < 1.0
    assert len(list((root / "eval" / "val").glob("*.png"))) == 2 and (root / "eval" / "val.md").is_file()
    # the workflow's MLflow run links its stages: the training run (one, continued after the failure) is its child
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("wf-test")
    workflow_runs = client.search_runs([exp.experiment_id], "tags.`pgseg.workflow` = 'wf'")
    assert len(workflow_runs) == 1
    wf = workflow_runs[0]
    train_id = wf.data.tags["stage.train.run_id"]
    train_runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "wf"]
    assert [r.info.run_id for r in train_runs] == [train_id]
    assert train_runs[0].data.tags["mlflow.parentRunId"] == wf.info.run_id
    # the training run's val mIoU, step by step: the final model's (scored by training, eval.final_datasets) at the
    # last step, and the evaluated model's (the best by dev) at the step it was taken at
    from pgseg.checkpoint import model_step

    val_history = [(m.step, m.value) for m in client.get_metric_history(train_id, "eval/val/mIoU")]
    evaluated_at = model_step(results["val"]["model"])
    assert results["val"]["model"].endswith("model_best.safetensors") and evaluated_at in (8, 16)
    assert any(s == evaluated_at and v == pytest.approx(results["val"]["miou"]) for s, v in val_history), val_history
    assert max(s for s, _ in val_history) == 16 and model_step(root / "runs" / "wf" / "model.safetensors") == 16
    assert wf.data.metrics["eval/val/mIoU"] == pytest.approx(results["val"]["miou"])
    history = client.get_metric_history(train_id, "eval/dev/mIoU")  # scored during training (every 8 steps)
    assert sorted(m.step for m in history) == [8, 16]
    # the oracle-group mIoU beside it: at the last step, the final model's own (scored again here)
    from pgseg.analyze import oracle_confusion
    from pgseg.checkpoint import load_model
    from pgseg.datasets import voc
    from pgseg.evaluate import confusion_in_process
    from pgseg.segment import ProtocolSettings, background_threshold

    oracle = {m.step: m.value for m in client.get_metric_history(train_id, "eval/dev/oracle_mIoU")}
    assert sorted(oracle) == [8, 16]
    final, config = load_model(root / "runs" / "wf" / "model.safetensors")
    dev = voc(root / "shapes" / "dev")
    settings = ProtocolSettings.of(config.eval, background_threshold(None, config.eval, dev.bg_thresh))
    assert oracle[16] == pytest.approx(oracle_confusion(final, dev, settings).scores().miou, abs=1e-3)
    # the learning curve (loss, dev mIoU, oracle mIoU against steps): its path printed, the picture in the run
    curve = root / "learning_curve.png"
    assert f"train: learning curve at {curve}" in printed and curve.read_bytes()[:4] == b"\x89PNG"
    assert "learning_curve.png" in {a.path for a in client.list_artifacts(train_id)}
    steps = [m.step for m in client.get_metric_history(train_id, "loss")]
    assert steps == sorted(set(steps)) and max(steps) == 16  # resumed, each step once
    # the analysis of the final model: the oracle-group mIoU on val is that model's own, in a file and on the
    # training run (figures, table, pictures)
    val = voc(root / "shapes" / "val")
    analysis = json.loads((root / "analyze" / "results.json").read_text())["val"]
    val_settings = ProtocolSettings.of(config.eval, background_threshold(None, config.eval, val.bg_thresh))
    final_val = confusion_in_process(final, val, val_settings).scores().miou
    assert [v for s, v in val_history if s == 16] == pytest.approx([final_val] * sum(s == 16 for s, _ in val_history))
    assert analysis["oracle_miou"] == pytest.approx(oracle_confusion(final, val, val_settings).scores().miou)
    assert (root / "analyze" / "val" / "groups.png").read_bytes()[:4] == b"\x89PNG"
    train_run = client.get_run(train_id)
    assert train_run.data.metrics["analyze/val/oracle_mIoU"] == pytest.approx(analysis["oracle_miou"])
    assert wf.data.metrics["analyze/val/oracle_mIoU"] == pytest.approx(analysis["oracle_miou"])
    assert {"analyze/val_analysis.json", "analyze/val_groups.png"} <= {
        a.path for a in client.list_artifacts(train_id, "analyze")}
    # 3. a finished experiment run again: every stage skipped, nothing rewritten
    mtime = (root / "eval" / "results.json").stat().st_mtime_ns
    third = run_workflow(experiment, printer=lambda _: None)
    assert set(_statuses(third).values()) == {"skipped"}
    assert (root / "eval" / "results.json").stat().st_mtime_ns == mtime
    # 4. asked to redo evaluation: only evaluation runs
    fourth = run_workflow(experiment, redo=["evaluate"], printer=lambda _: None)
    assert _statuses(fourth) == {"sources": "skipped", "download": "skipped", "train": "skipped", "evaluate": "ran", "analyze": "ran"}
    # 5. the download section changed (smaller images): download, train and evaluate run again; the training run
    #    starts over (the earlier one moved aside and kept, its MLflow run too) instead of continuing on other data
    from pipelines.digest import file_digest

    model = root / "runs" / "wf" / "model.safetensors"
    trained_before = file_digest(model)
    fifth = run_workflow(load_experiment(path, ["download.image_size=48"]), printer=lambda _: None)
    assert _statuses(fifth) == {"sources": "skipped", "download": "ran", "train": "ran", "evaluate": "ran",
                                "analyze": "ran"}
    assert {p.name for p in (root / "shards").glob("*.tar")} == set(shards_before)
    assert {p.name: p.stat().st_mtime_ns for p in (root / "shards").glob("*.tar")} != shards_before
    aside = [p for p in (root / "runs").iterdir() if p.name.startswith("wf@")]
    assert len(aside) == 1 and file_digest(aside[0] / "model.safetensors") == trained_before
    assert file_digest(model) != trained_before
    new_train = next(o.record.run_id for o in fifth.outcomes if o.stage == "train")
    assert new_train != train_id and client.get_run(train_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(new_train, "loss")) == [4, 8, 12, 16]  # from step 1 on


def test_a_changed_section_reruns_that_stage_and_the_ones_after(tmp_path):
    """Input hashes: changing the evaluate section changes only its hash; changing download's changes download's
    and (through the digests chain at run time) everything after it."""
    from pipelines.flow import load_experiment
    from pipelines.flow.experiment import training_config
    from pipelines.flow.stages import stage_section

    path = _experiment(tmp_path, None)
    base = load_experiment(path)
    changed = load_experiment(path, ["evaluate.overlays=3"])
    same = [s for s in base.stages if stage_section(base, s) == stage_section(changed, s)]
    assert same == ["sources", "download", "train", "analyze"]  # (analyze runs again: a stage before it ran)
    changed = load_experiment(path, ["train.optim.lr=0.002"])
    assert [s for s in base.stages if stage_section(base, s) != stage_section(changed, s)] == ["train"]
    # a storage of its own moves the shards and the runs: download and train start there
    moved = load_experiment(path, [f"storage={tmp_path / 'elsewhere'}"])
    assert [s for s in base.stages if stage_section(base, s) != stage_section(moved, s)] == ["download", "train"]
    assert training_config(moved).data.shards == [str(tmp_path / "elsewhere" / "shards")]
    assert training_config(moved).train.storage_path == str(tmp_path / "elsewhere" / "runs")


@pytest.mark.parametrize("override, message", [
    ("train.optim.lrr=1", "train.optim.lrr: unknown key"),
    ("download.foo=1", "download.foo: unknown key"),
    ("sources.shapes.world.num_classes=99", "sources.shapes.world: num_classes must be in [1, 8]"),
    ("evaluate.datasets=[]", "evaluate.datasets: give at least one"),
    ("analyze.max_images=0", "analyze.max_images: must be >= 1, got 0"),
    ("analyze.model=last", "analyze.model"),
    ("train.eval.datasets=[nocolon]", "train.eval.datasets[0]: expected KIND:ROOT"),
])
def test_experiment_errors_name_the_key_before_anything_runs(tmp_path, override, message):
    from pgseg.config import ConfigError
    from pipelines.flow import load_experiment

    path = _experiment(tmp_path, None)
    with pytest.raises(ConfigError) as err:
        load_experiment(path, [override])
    assert message in str(err.value)
    assert not (tmp_path / "wf").exists()


def test_the_shapes_set_needs_the_shapes_world(tmp_path):
    from pgseg.config import ConfigError
    from pipelines.flow import load_experiment

    path = tmp_path / "noworld.yaml"
    for stage in ("evaluate", "analyze"):
        path.write_text(yaml.safe_dump({"name": "x", "train": {"base": "tiny", "data": {"shards": [str(tmp_path)]}},
                                        stage: {"datasets": ["shapes"]}}))
        with pytest.raises(ConfigError, match=f"{stage}.datasets: 'shapes' is the generated world's val set, but the "
                                              f"experiment has no sources.shapes stage"):
            load_experiment(path)


def test_cli_reports_a_bad_experiment_with_exit_2(tmp_path, capsys):
    from jobs.cli import main

    (tmp_path / "bad.yaml").write_text("name: x\nstages: [train]\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "stages: unknown key" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_ready_experiments_load():
    from pipelines.flow import load_experiment

    folder = Path(__file__).resolve().parents[2] / "configs" / "experiments"
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert {"quickstart", "paper_cc12m", "paper_cc12m_redcaps", "official_groupvit_init"} <= set(names)
    for name in names:
        experiment = load_experiment(folder / f"{name}.yaml")
        assert "evaluate" in experiment.stages
