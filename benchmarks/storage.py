"""Object storage against local disk, side by side in one run, with moto's S3 server on 127.0.0.1 standing in for S3
(a loopback server: what is measured is the cost of going through the S3 protocol and our waiting for it, not a
cloud's bandwidth):

- checkpoints: the tiny PGSeg trained with a checkpoint after every step into a bucket with Ray Train's synchronous
  upload (the step loop waits for the copy) and its asynchronous one (a background thread copies while training goes
  on), and into a local folder both ways; per mode, the median time the step loop spent on a checkpoint and the median
  images/s of the steps (the checkpoint's wait included), alternating the modes round by round;
- ingest: one pass of Ray Data's read + preprocess over the same shards in a bucket and on local disk, images/s.

    python -m benchmarks.storage [--steps 12] [--rounds 2] [--images 2048] [--out results/storage-cpu.json]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.record import REPO, commit_state, write_record
from pipelines.runtime import free_port, use_loopback

use_loopback()  # before Ray is imported
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SIZE, CONTEXT = 64, 16
MODES = ("s3-sync", "s3-async", "local-sync", "local-async")


def _s3(port: int):
    """moto's S3 server in this process on 127.0.0.1, every S3 client of this run (Ray's workers too) sent to it."""
    from moto.server import ThreadedMotoServer

    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def _fit(mode: str, shards: str, storage: str, uri: str, steps: int, name: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from pgseg.config import load_config
    from pipelines.train import fit, plan_training

    config = load_config("tiny", [f"data.shards=[{shards}]", "data.batch_size=16", "data.augment=false",
                                  f"data.samples_per_epoch={16 * steps}", "schedule.epochs=1",
                                  "train.cpus_per_worker=1", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                                  f"train.checkpoint_upload={mode.split('-')[1]}", f"train.storage_path={storage}",
                                  f"train.name={name}", f"tracking.uri={uri}", "tracking.log_every=1",
                                  "tracking.log_models=false", "tracking.log_model=false"])
    result = fit(plan_training(config))
    assert result.finished, result
    client = MlflowClient(uri)

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)]

    waits = [v for v in history("time/checkpoint")[2:] if v > 0]  # from the second checkpoint on (warm)
    speed = history("images_per_s")[2:]  # each window holds one step and the previous checkpoint's wait
    return {"checkpoint_s": statistics.median(waits), "images_per_s": statistics.median(speed)}


def _ingest_pass(source: str) -> float:
    from pipelines.data.ingest import Ingest

    ingest = Ingest.from_paths([source], img_size=SIZE, context_length=CONTEXT, seed=0)
    start, n = time.perf_counter(), 0
    for batch in ingest.dataset(0).iter_batches(batch_size=64, batch_format="numpy"):
        n += len(batch["image"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="steps per training run (a checkpoint after each)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of every mode")
    parser.add_argument("--images", type=int, default=2048, help="training images in the shard set")
    parser.add_argument("--out", default=str(REPO / "results" / "storage-cpu.json"))
    args = parser.parse_args()
    import ray

    from pipelines.data.download import DownloadSpec, download
    from pipelines.data.shapes_world import ShapesWorld, write_train_images, write_url_list
    from pipelines.runtime import start_ray

    server = _s3(free_port())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            rows = write_train_images(ShapesWorld(image_size=SIZE), root / "www", args.images)
            write_url_list(rows, (root / "www").resolve().as_uri(), root / "urls")
            spec = DownloadSpec(image_size=SIZE, number_sample_per_shard=512, processes_count=2, thread_count=8)
            download(root / "urls", root / "shards", spec)
            download(root / "urls", "s3://bench/shards", spec)
            start_ray(num_cpus=os.cpu_count() or 2, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            uri = f"sqlite:///{root / 'mlflow.db'}"
            places = {m: "s3://bench/runs" if m.startswith("s3") else str(root / "runs") for m in MODES}
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
            ingest: dict[str, list[float]] = {"s3": [], "local": []}
            for r in range(args.rounds):
                for mode in MODES:
                    runs[mode].append(_fit(mode, str(root / "shards"), places[mode], uri, args.steps, f"{mode}-{r}"))
                    print(mode, runs[mode][-1])
                for where, source in (("s3", "s3://bench/shards"), ("local", str(root / "shards"))):
                    ingest[where].append(_ingest_pass(source))
                    print("ingest", where, f"{ingest[where][-1]:.0f} images/s")
    finally:
        ray.shutdown()
        server.stop()
    rows = {m: {k: statistics.median(run[k] for run in runs[m]) for k in ("checkpoint_s", "images_per_s")}
            for m in MODES}
    sync, asynchronous = rows["s3-sync"], rows["s3-async"]
    figures = {
        "checkpoints": rows,
        "s3_async_vs_sync_images_per_s": asynchronous["images_per_s"] / sync["images_per_s"],
        "s3_sync_vs_async_checkpoint_wait": sync["checkpoint_s"] / asynchronous["checkpoint_s"],
        "ingest_images_per_s": {k: statistics.median(v) for k, v in ingest.items()},
    }
    figures["ingest_s3_vs_local"] = figures["ingest_images_per_s"]["s3"] / figures["ingest_images_per_s"]["local"]
    for mode, row in rows.items():
        print(f"{mode:10s}  checkpoint wait {1e3 * row['checkpoint_s']:7.1f} ms   {row['images_per_s']:7.1f} images/s")
    print(f"asynchronous upload: {figures['s3_async_vs_sync_images_per_s']:.2f}x the images/s of synchronous, "
          f"checkpoint wait {figures['s3_sync_vs_async_checkpoint_wait']:.1f}x shorter")
    print(f"ingest: S3 {figures['ingest_images_per_s']['s3']:.0f} vs local {figures['ingest_images_per_s']['local']:.0f}"
          f" images/s ({figures['ingest_s3_vs_local']:.2f}x)")
    commit, dirty = commit_state()
    write_record(args.out, {
        "command": f"python -m benchmarks.storage --steps {args.steps} --rounds {args.rounds} --images {args.images}",
        "commit": commit, "dirty": dirty, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores", "server": "moto (ThreadedMotoServer) on 127.0.0.1",
        "preset": "tiny", "batch": 16, "images": args.images, **figures})


if __name__ == "__main__":
    main()
