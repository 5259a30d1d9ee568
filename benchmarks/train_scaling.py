"""Training throughput of the ``tiny`` config on CPU: the same training step (pgseg.train.TrainStep) in a plain
process and on Ray Train with 1 and 2 workers, measured in one run on shapes-world shards made by img2dataset.

Printed: images/s of each, the step split (data wait, forward+backward, NPR = EM + matching inside it, optimiser)
and Ray Train's overhead against the plain process (ratio of images/s at one worker, same thread count).

    python -m benchmarks.train_scaling [--images 3072] [--batch 32] [--steps 40]

A new pass over the shards restarts Ray Data's streaming execution (seconds on 2 cores): the default sizes keep
the measured steps inside the first pass, as they are on a real dataset.
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


def make_shards(root: Path, images: int, image_size: int = 64) -> Path:
    from pipelines.data.download import DownloadSpec, download
    from pipelines.data.shapes_world import ShapesWorld, write_train_images, write_url_list

    world = ShapesWorld(num_classes=4, image_size=image_size, seed=0)
    rows = write_train_images(world, root / "www", images)
    write_url_list(rows, (root / "www").resolve().as_uri(), root / "urls")
    download(root / "urls", root / "shards", DownloadSpec(image_size=image_size, number_sample_per_shard=256,
                                                          processes_count=min(8, os.cpu_count() or 1), thread_count=8))
    return root / "shards"


def plain_process(config, shards: Path, steps: int, profile_steps: int = 5, device: str = "cpu") -> dict[str, float]:
    """The step loop in this process, data decoded here; on a CPU with one torch thread (as a 1-CPU Ray worker
    gets)."""
    import tarfile

    import numpy as np
    import torch

    from pgseg.text import tokenize
    from pipelines.data.ingest import preprocess_image
    from pgseg.train import TrainStep

    if device == "cpu":
        torch.set_num_threads(1)
    samples = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        keys = sorted({n.rsplit(".", 1)[0] for n in members if n.endswith(".jpg")})
        samples += [(members[f"{k}.jpg"], members[f"{k}.txt"].decode()) for k in keys]
    rng = np.random.default_rng(0)
    b, size, length = config.data.batch_size, config.data.img_size, config.model.text.context_length

    def batch(i: int) -> dict[str, torch.Tensor]:
        chunk = [samples[(i * b + j) % len(samples)] for j in range(b)]
        images = np.stack([preprocess_image(d, size, config.data.min_scale, True, rng) for d, _ in chunk])
        return {"image": torch.from_numpy(images).to(device),
                "tokens": tokenize([c for _, c in chunk], length).to(device)}

    stepper = TrainStep(config, steps_per_epoch=steps, device=torch.device(device))
    for i in range(3):  # warm-up (numba, allocator)
        stepper(batch(i), i)
    totals = {"time/data": 0.0, "time/compute": 0.0, "time/optim": 0.0}
    start = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        data = batch(i)
        totals["time/data"] += time.perf_counter() - t0
        for k, v in stepper(data, 3 + i).seconds.items():
            totals[k] += v
    if device != "cpu":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(profile_steps):
            stepper(batch(i), 3 + steps + i)
    events = {e.key: e.cpu_time_total / 1e6 / profile_steps for e in prof.key_averages()}
    out = {k: v / steps for k, v in totals.items()}
    out["npr"] = events.get("npr.em", 0.0) + events.get("npr.matching", 0.0)
    out["images_per_s"] = steps * b / wall
    return out


def ray_train(config, steps: int, workers: int, root: Path, use_gpu: bool = False) -> dict[str, float]:
    """fit() on the local Ray cluster; the figures of the second half of the run (the first half warms up)."""
    from pgseg.config import load_config, to_dict
    from pipelines.train import fit, plan_training

    half = steps // 2
    cfg = load_config(to_dict(config), [f"train.workers={workers}", f"train.use_gpu={str(use_gpu).lower()}",
                                        f"train.cpus_per_worker={1.0 if workers == 1 else 0.5}",
                                        f"tracking.log_every={half}", f"train.checkpoint_every={half}",
                                        f"train.storage_path={root / 'runs'}", f"train.name=bench-{workers}w",
                                        "tracking.enabled=false"])
    plan = plan_training(cfg)
    epochs = max(1, -(-steps // plan.steps_per_epoch))
    cfg = load_config(to_dict(cfg), [f"schedule.epochs={epochs}", f"train.stop_after={steps}",
                                     f"schedule.warmup_epochs={min(cfg.schedule.warmup_epochs, epochs)}"])
    result = fit(plan_training(cfg))
    m = result.metrics
    return {k: float(m[k]) for k in ("images_per_s", "time/data", "time/compute", "time/optim")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3072, help="enough that no worker starts a second pass")
    parser.add_argument("--batch", type=int, default=32, help="per worker")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    import logging

    import ray

    from pgseg.config import load_config

    root = Path(tempfile.mkdtemp(prefix="pgseg-bench-train-"))
    shards = make_shards(root, args.images)
    config = load_config("tiny", [f"data.shards=[{shards}]", f"data.batch_size={args.batch}"])
    plain = plain_process(config, shards, args.steps)
    start_ray(num_cpus=os.cpu_count(), log_to_driver=False, logging_level=logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    one = ray_train(config, args.steps, 1, root)
    two = ray_train(config, args.steps, 2, root)
    ray.shutdown()

    print(f"\ntiny config, {args.batch} images per worker per step, {os.cpu_count()} CPU cores, fp32")
    print(f"{'':28}{'images/s':>10}{'data s':>10}{'fwd+bwd s':>11}{'optim s':>10}")
    for name, r in (("plain process (1 thread)", plain), ("Ray Train, 1 worker", one), ("Ray Train, 2 workers", two)):
        print(f"{name:28}{r['images_per_s']:10.1f}{r['time/data']:10.4f}{r['time/compute']:11.4f}"
              f"{r['time/optim']:10.4f}")
    print(f"NPR (EM + matching) inside forward+backward, plain process: {plain['npr']:.4f} s/step "
          f"({100 * plain['npr'] / plain['time/compute']:.1f} %)")
    print(f"Ray Train overhead at 1 worker: images/s ratio Ray/plain = {one['images_per_s'] / plain['images_per_s']:.3f}")
    step = {n: r["time/compute"] + r["time/optim"] for n, r in (("plain", plain), ("one", one))}
    print(f"training step alone (forward+backward+optimiser) at 1 worker: Ray/plain = {step['one'] / step['plain']:.3f}"
          f" ({step['one']:.4f} s vs {step['plain']:.4f} s); the plain loop also decodes its data in the same thread")
    print(f"scaling 1 → 2 workers: {two['images_per_s'] / one['images_per_s']:.2f}×")


if __name__ == "__main__":
    main()
