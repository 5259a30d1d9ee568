"""``s3://`` for real, against moto's S3 server on 127.0.0.1 (tests/s3_process.py): a shard set in a bucket is
imported where it is and read by Ray Data's workers through the session's Ray, every sample of it; a training run
stored in a bucket checkpoints there and resumes from there."""
from __future__ import annotations

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
