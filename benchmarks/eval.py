"""Zero-shot segmentation evaluation throughput: the SPEC §6 sliding-window protocol for ``pgseg_vit_s`` on CPU,
VOC-sized images (500×375 → short side 448 → two 448×448 windows each), in this process (all cores) and on the Ray
Data path with 2 model actors (1 CPU each), measured side by side in one run. Also the quickstart's wall time split
by stage, read from its workflow manifests when a quickstart has run (``--workdir``).

    python -m benchmarks.eval [--images 16] [--workdir outputs/quickstart]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from pipelines.runtime import start_ray, use_loopback  # noqa: E402

use_loopback()  # before Ray is imported
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def make_voc(root: Path, images: int) -> Path:
    """A VOC-layout folder of textured 500×375 images with 21-class masks."""
    import numpy as np
    from PIL import Image

    from pgseg.visualize import PALETTE

    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(images):
        arr = rng.integers(0, 255, size=(375, 500, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "JPEGImages" / f"{i:06d}.jpg", quality=90)
        mask = Image.fromarray(rng.integers(0, 21, size=(375, 500), dtype=np.uint8), mode="P")
        mask.putpalette(PALETTE)
        mask.save(root / "SegmentationClass" / f"{i:06d}.png")
        ids.append(f"{i:06d}")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return root


def stage_split(workdir: Path) -> str | None:
    records = []
    for stage in ("sources", "download", "train", "evaluate"):
        path = workdir / ".workflow" / f"{stage}.json"
        if path.is_file():
            records.append((stage, json.loads(path.read_text())["seconds"]))
    if not records:
        return None
    total = sum(s for _, s in records)
    lines = [f"quickstart stages (from {workdir}/.workflow, the last time each ran):"]
    lines += [f"  {stage:<9}{seconds:8.1f} s  {100 * seconds / total:5.1f} %" for stage, seconds in records]
    lines.append(f"  {'total':<9}{total:8.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--workdir", default="outputs/quickstart")
    args = parser.parse_args()

    import logging

    import ray
    import torch

    from pgseg.checkpoint import save_model
    from pgseg.config import load_config
    from pgseg.datasets import voc
    from pgseg.model import PGSeg
    from pgseg.segment import ProtocolSettings
    from pgseg.evaluate import evaluate_in_process
    from pipelines.evaluate import evaluate

    root = Path(tempfile.mkdtemp(prefix="pgseg-bench-eval-"))
    config = load_config("pgseg_vit_s")
    torch.manual_seed(0)
    model = PGSeg.from_config(config).eval()
    model_path = save_model(model, config, root / "model.safetensors")
    dataset = voc(make_voc(root / "voc", args.images))
    settings = ProtocolSettings(window=448, stride=224, short_side=448, bg_thresh=0.95)
    cores = len(os.sched_getaffinity(0))

    start = time.perf_counter()
    plain_scores, _ = evaluate_in_process(model, dataset, settings)
    plain = time.perf_counter() - start

    start_ray(num_cpus=cores, logging_level=logging.ERROR, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    result = evaluate(str(model_path), dataset, settings, actors=2, cpus_per_actor=cores / 2, overlays=0)
    ray_time = time.perf_counter() - start
    ray.shutdown()
    assert abs(result.scores.miou - plain_scores.miou) < 1e-9, "the two paths disagree"

    n = args.images
    print(f"pgseg_vit_s zero-shot segmentation, {n} VOC-sized images (500x375 -> 597x448, 2 windows each), "
          f"{cores} CPU cores, fp32")
    print(f"  single process ({torch.get_num_threads()} threads): {plain:7.1f} s  {n / plain:6.2f} images/s")
    print(f"  Ray Data, 2 actors x {cores / 2:g} CPU:     {ray_time:7.1f} s  {n / ray_time:6.2f} images/s "
          f"(incl. actor start and model load)")
    print(f"  Ray/plain images/s ratio: {plain / ray_time:.2f}; same mIoU on both paths ({100 * plain_scores.miou:.2f})")
    split = stage_split(Path(args.workdir))
    print(split or f"no quickstart manifests under {args.workdir} (run `pgseg quickstart` first for the stage split)")


if __name__ == "__main__":
    main()
