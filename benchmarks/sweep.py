"""Sweep overhead: the wall time of a 2-trial Ray Tune sweep (``pipelines.tune.run_sweep``: a function trainable
per trial that fits the TorchTrainer) against the same two trainings run back to back with
``pipelines.train.fit`` and no Tune, measured in one run on one local Ray with the ``tiny`` config on CPU and
shapes-world shards made by img2dataset. Both sides score the dev set during training, as a sweep's trials do.

    python -m benchmarks.sweep [--steps 32] [--images 1024]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pipelines.runtime import start_ray, use_loopback  # noqa: E402

use_loopback()  # before Ray is imported
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=32, help="training steps per trial (batch 16, 1 worker)")
    parser.add_argument("--images", type=int, default=1024, help="shapes-world training images")
    args = parser.parse_args()

    import logging

    import ray
    import yaml

    from benchmarks.train_scaling import make_shards
    from pgseg.config import load_config
    from pipelines.data.shapes_world import ShapesWorld, write_voc_val
    from pipelines.tune import load_sweep, run_sweep
    from pipelines.train import fit, plan_training

    root = Path(tempfile.mkdtemp(prefix="pgseg-bench-sweep-"))
    shards = make_shards(root, args.images)
    dev = write_voc_val(ShapesWorld(num_classes=4, image_size=64, seed=0), root / "dev", 16, "dev")
    base = {"base": "tiny",
            "data": {"shards": [str(shards)], "batch_size": 16, "samples_per_epoch": 16 * args.steps, "augment": False},
            "schedule": {"epochs": 1},
            "train": {"workers": 1, "cpus_per_worker": 0.5, "checkpoint_every": 8},
            "eval": {"datasets": [f"voc:{dev}"], "every_steps": 8},
            "tracking": {"enabled": False}}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    (root / "sweep.yaml").write_text(yaml.safe_dump({"name": "bench", "base": str(root / "base.yaml"),
                                                     "workdir": str(root), "metric": "eval/dev/mIoU",
                                                     "space": {"train.seed": {"grid": [0, 1]}}}))
    start_ray(num_cpus=2, log_to_driver=False, logging_level=logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False

    start = time.perf_counter()
    for seed in (0, 1):
        config = load_config(str(root / "base.yaml"), [f"train.seed={seed}", f"train.name=plain-{seed}",
                                                       f"train.storage_path={root / 'plain'}"])
        assert fit(plan_training(config)).finished
    plain = time.perf_counter() - start

    start = time.perf_counter()
    result = run_sweep(load_sweep(root / "sweep.yaml"), printer=lambda _: None)
    swept = time.perf_counter() - start
    assert [r.status for r in result.rows] == ["finished", "finished"], result.rows
    ray.shutdown()

    print(f"tiny, {args.steps} steps of 16 per run, 1 worker × 0.5 CPU, dev set scored every 8 steps, 2 CPUs")
    print(f"two trainings back to back (fit, no Tune): {plain:6.1f} s  ({plain / 2:.1f} s per run)")
    print(f"2-trial sweep (Tune, one trial at a time): {swept:6.1f} s  ({swept / 2:.1f} s per trial)")
    print(f"sweep / back to back: {swept / plain:.2f}  (+{swept - plain:.1f} s, {(swept - plain) / 2:.1f} s per trial)")


if __name__ == "__main__":
    main()
