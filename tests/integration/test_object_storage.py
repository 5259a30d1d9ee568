"""``s3://`` for real, against moto's S3 server on 127.0.0.1 (tests/s3_process.py): a shard set in a bucket is
imported where it is and read by Ray Data's workers through the session's Ray, every sample of it; a training run
stored in a bucket checkpoints there and resumes from there; MLflow's artifacts in a bucket; a workflow whose shards
and runs live in a bucket. (The Ray distributor's download into a bucket: test_download.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def test_a_shard_set_in_a_bucket_is_imported_and_read_by_ray_workers(ray_local, s3_server, tmp_path):
    from mirrors import write_mirror

    from pgseg.text import tokenize
    from pipelines.data.ingest import Ingest
    from pipelines.data.shard_sets import KeyMap, import_shards

    bucket = s3_server.bucket("mirror-set")
    captions = [c for shard in write_mirror(f"{bucket}/cc-mirror").values() for c in shard]
    manifest = import_shards(f"{bucket}/cc-mirror", tmp_path / "imported", KeyMap.parse("webp", "json:caption"))
    assert [s["tar"] for s in manifest["shards"]] == [f"{bucket}/cc-mirror/part-{s:03d}.tar" for s in range(2)]
    assert manifest["samples"] == len(captions) and manifest["counts"]["read"] == 2

    ingest = Ingest.from_paths([str(tmp_path / "imported")], img_size=32, context_length=16, seed=0)
    tokens = torch.cat([b["tokens"] for b in ingest.dataset(0).iter_torch_batches(batch_size=4, drop_last=False)])
    assert tokens.shape[0] == len(captions)  # each sample once, read from the bucket by Ray Data's tasks
    assert sorted(map(tuple, tokens.tolist())) == sorted(map(tuple, tokenize(captions, 16).tolist()))
    assert all(v == 0 for v in ingest.skips().values()), ingest.skips()


def test_the_s3_server_listens_on_loopback_only(s3_server):
    from listening import listening_addresses

    listeners = listening_addresses(int(s3_server.endpoint.rsplit(":", 1)[1]))
    assert listeners and all(a == "0100007F" for a in listeners), listeners  # 127.0.0.1


def test_a_run_stored_in_a_bucket_checkpoints_there_and_resumes_from_it(ray_local, shapes_data, s3_server, tmp_path):
    """train.storage_path = s3://…: Ray Train's checkpoints (our state file in each) are objects in the bucket; a
    run stopped at a checkpoint continues from it there, and the finished run's model is exported from it."""
    import pyarrow.fs as pafs
    from training_runs import checkpoint_state, tiny_config

    from pgseg.checkpoint import model_step
    from pgseg.train import STATE_FILE
    from pipelines.train import fit, plan_training

    bucket = s3_server.bucket("runs")
    sets = ["data.batch_size=32", "train.checkpoint_every=4", "train.name=in-bucket",
            f"train.storage_path={bucket}/pgseg"]
    first = fit(plan_training(tiny_config(shapes_data, tmp_path, *sets, "train.stop_after=4")))
    assert (first.step, first.finished) == (4, False)
    fs, _ = pafs.FileSystem.from_uri(bucket)
    stored = [i.path for i in fs.get_file_info(pafs.FileSelector("runs/pgseg/in-bucket", recursive=True))]
    states = [p for p in stored if p.endswith(f"/{STATE_FILE}")]
    assert states, stored  # the checkpoint is in the bucket, not on this disk
    assert not (tmp_path / "runs").exists()

    config = tiny_config(shapes_data, tmp_path, *sets)
    resumed = fit(plan_training(config))
    assert resumed.finished and resumed.step == plan_training(config).total_steps > first.step
    assert resumed.run_id == first.run_id  # the same MLflow run, continued
    assert model_step(resumed.model_file) == resumed.step  # exported from the bucket's last checkpoint
    stored = [i.path for i in fs.get_file_info(pafs.FileSelector("runs/pgseg/in-bucket", recursive=True))]
    assert len([p for p in stored if p.endswith(f"/{STATE_FILE}")]) > len(states)
    latest = sorted(p for p in stored if p.endswith(f"/{STATE_FILE}"))[-1]  # (checkpoint folders named by time)
    (tmp_path / "latest").mkdir()
    pafs.copy_files(f"s3://{latest}", str(tmp_path / "latest" / STATE_FILE))
    assert checkpoint_state(tmp_path / "latest")["step"] == resumed.step


def test_an_mlflow_server_keeps_our_artifacts_in_a_bucket(s3_server, tmp_path):
    """MLflow's artifact store on S3 (``mlflow server --artifacts-destination s3://…``): what we log (a run's
    evaluation table and its text) becomes objects in the bucket and reads back the same through the
    server."""
    import pyarrow.fs as pafs
    from mlflow_process import MlflowServer

    from pipelines.tracking import Tracker

    bucket = s3_server.bucket("mlflow-artifacts")
    server = MlflowServer(tmp_path, artifacts=f"{bucket}/store").start()
    try:
        tracker = Tracker(server.uri, check=True)
        run_id = tracker.create_run("in-a-bucket", "eval")
        table = {"class": ["circle", "square"], "iou": [0.5, 0.25]}
        tracker.log_table(run_id, table, "eval/val_iou.json")
        tracker.log_text(run_id, "mIoU 37.50", "eval/val_iou.md")
        tracker.end(run_id, "FINISHED")
        fs, _ = pafs.FileSystem.from_uri(bucket)
        stored = {i.path.rsplit("/artifacts/", 1)[-1]
                  for i in fs.get_file_info(pafs.FileSelector("mlflow-artifacts/store", recursive=True))
                  if i.type == pafs.FileType.File}
        assert {"eval/val_iou.json", "eval/val_iou.md"} <= stored, stored
        back = tracker.client.download_artifacts(run_id, "eval/val_iou.md", str(tmp_path))
        assert open(back).read() == "mIoU 37.50"
    finally:
        server.stop()


def _bucket_files(bucket: str) -> dict[str, tuple[int, int]]:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(bucket)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {i.path[len(path) + 1:]: (i.mtime_ns, i.size) for i in found if i.type == pafs.FileType.File}


def test_a_workflow_keeps_its_shards_and_runs_in_a_bucket_and_skips_them_when_run_again(ray_local, s3_server,
                                                                                         tmp_path):
    """An experiment with ``storage: s3://…``: the download stage writes shards and manifest into the bucket,
    training reads them from there and checkpoints there, the final model comes back to the workdir for the
    evaluation; run again, every stage is skipped (the outputs found in the bucket) and nothing there is written;
    with the download's inputs changed, the stage stops with the reason instead of moving the prefix aside."""
    import yaml

    from pgseg.checkpoint import model_step
    from pgseg.config import ConfigError
    from pipelines.flow import WorkflowError, load_experiment, run_workflow

    bucket = s3_server.bucket("workflow")
    spec = {"name": "wf-s3", "workdir": str(tmp_path / "wf"), "storage": f"{bucket}/store",
            "tracking": {"enabled": False},
            "sources": {"shapes": {"world": {"num_classes": 2, "image_size": 64, "seed": 4},
                                   "train_images": 64, "val_images": 3, "dev_images": 0, "serve": "http"}},
            "download": {"image_size": 64, "number_sample_per_shard": 32, "processes_count": 1, "thread_count": 4},
            "train": {"base": "tiny", "data": {"batch_size": 16, "augment": False}, "schedule": {"epochs": 1},
                      "train": {"workers": 1, "cpus_per_worker": 0.5, "checkpoint_every": 2}},
            "evaluate": {"datasets": ["shapes"], "overlays": 0}}
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(spec))
    experiment = load_experiment(path)
    first = run_workflow(experiment, printer=lambda _: None)
    assert [(o.stage, o.status) for o in first.outcomes] == [("sources", "ran"), ("download", "ran"),
                                                            ("train", "ran"), ("evaluate", "ran")]
    stored = _bucket_files(bucket)
    assert {"store/shards/manifest.json", "store/shards/00000.tar", "store/shards/00001.tar",
            "store/.shards.inputs.json"} <= set(stored), sorted(stored)
    assert any(name.startswith("store/runs/wf-s3/checkpoint") for name in stored), sorted(stored)
    root = experiment.root
    assert not (root / "shards").exists() and not (root / "runs").exists()  # nothing of them on this disk
    train = next(o.record for o in first.outcomes if o.stage == "train")
    assert Path(train.outputs["model"]) == root / "model" / "model.safetensors" and model_step(train.outputs["model"]) == 4
    assert json.loads((root / "eval" / "results.json").read_text())["val"]["images"] == 3

    printed: list[str] = []
    again = run_workflow(load_experiment(path), printer=printed.append)
    assert {o.status for o in again.outcomes} == {"skipped"}, printed
    assert _bucket_files(bucket) == stored

    with pytest.raises(WorkflowError) as changed:
        run_workflow(load_experiment(path, ["download.image_size=48"]), printer=lambda _: None)
    assert changed.value.stage == "download" and isinstance(changed.value.__cause__, ConfigError)
    assert "inputs changed since s3://workflow/store/shards" in str(changed.value.__cause__)
    assert _bucket_files(bucket) == stored  # nothing in the bucket moved, removed or written


def test_a_bucket_that_does_not_exist_is_named_before_any_download(s3_server, tmp_path):
    from conftest import REPO
    from pipelines.data.shapes_world import ShapesWorld, write_train_images, write_url_list

    rows = write_train_images(ShapesWorld(seed=5), tmp_path / "www", 2)
    write_url_list(rows, (tmp_path / "www").resolve().as_uri(), tmp_path / "urls")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "data", "download", str(tmp_path / "urls"),
                           "s3://no-such-bucket/shards", "--processes", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "download output s3://no-such-bucket/shards: cannot write there" in proc.stderr
    assert "The specified bucket does not exist" in proc.stderr and "Traceback" not in proc.stderr
