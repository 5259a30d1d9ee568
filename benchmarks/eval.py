"""Zero-shot segmentation evaluation throughput: the SPEC §6 sliding-window protocol for ``pgseg_vit_s`` on CPU,
VOC-sized images (500×375 → short side 448 → two 448×448 windows each), side by side in one run: in this process
(all cores) one window per forward pass, one image's windows together, and four images' windows together
(alternating rounds, the confusion counts of each checked against the first's), then the Ray Data path with 2 model
actors. Also the quickstart's wall time split by stage, read from its workflow manifests when a quickstart has run
(``--workdir``). Writes ``results/eval-cpu.json``.

    python -m benchmarks.eval [--images 16] [--rounds 5] [--workdir outputs/quickstart]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

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


def _confusion(segmenter, dataset, images_per_batch: int) -> np.ndarray:
    from pgseg.evaluate import score_samples

    n = len(dataset.class_names)
    matrix = np.zeros((n, n), np.int64)
    samples = [(str(s.image), str(s.mask)) for s in dataset]
    for start in range(0, len(samples), images_per_batch):
        for codes, counts, *_ in score_samples(segmenter, samples[start:start + images_per_batch], n, dataset.reader,
                                               False):
            matrix.reshape(-1)[codes] += counts
    return matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="outputs/quickstart")
    parser.add_argument("--out", default=None, help="default: results/eval-cpu.json")
    args = parser.parse_args()

    import logging

    import ray
    import torch

    from benchmarks.common import median
    from benchmarks.record import REPO, commit_state, write_record
    from pgseg.checkpoint import save_model
    from pgseg.config import load_config
    from pgseg.datasets import voc
    from pgseg.evaluate import dataset_segmenter
    from pgseg.metrics import ConfusionMatrix
    from pgseg.model import PGSeg
    from pgseg.segment import ProtocolSettings
    from pipelines.evaluate import evaluate

    root = Path(tempfile.mkdtemp(prefix="pgseg-bench-eval-"))
    config = load_config("pgseg_vit_s")
    torch.manual_seed(0)
    model = PGSeg.from_config(config).eval()
    model_path = save_model(model, config, root / "model.safetensors")
    dataset = voc(make_voc(root / "voc", args.images))
    settings = ProtocolSettings(window=448, stride=224, short_side=448, bg_thresh=0.95)
    cores = len(os.sched_getaffinity(0))
    # in this process: one window per forward pass; one image's windows together; 4 images' windows together
    paths = {"one_window": (dataset_segmenter(model, dataset.class_names, settings, batch=1), 1),
             "one_image": (dataset_segmenter(model, dataset.class_names, settings, batch=8), 1),
             "four_images": (dataset_segmenter(model, dataset.class_names, settings, batch=8), 4)}
    matrices = {name: _confusion(segmenter, dataset, k) for name, (segmenter, k) in paths.items()}  # + warm-up
    same = {name: bool(np.array_equal(m, matrices["one_window"])) for name, m in matrices.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):  # alternating rounds
        for name, (segmenter, k) in paths.items():
            start = time.perf_counter()
            _confusion(segmenter, dataset, k)
            times[name].append(time.perf_counter() - start)
    seconds = {name: median(t) for name, t in times.items()}

    start_ray(num_cpus=cores, logging_level=logging.ERROR, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    result = evaluate(str(model_path), dataset, settings, actors=2, cpus_per_actor=cores / 2, overlays=0)
    seconds["ray_2_actors"] = time.perf_counter() - start
    ray.shutdown()
    reference = ConfusionMatrix(len(dataset.class_names))
    reference.matrix = torch.from_numpy(matrices["one_window"])
    same["ray_2_actors"] = bool(np.array_equal(result.scores.iou, reference.scores().iou, equal_nan=True))

    n = args.images
    print(f"pgseg_vit_s zero-shot segmentation, {n} VOC-sized images (500x375 -> 597x448, 2 windows each), "
          f"{cores} CPU cores, fp32, {torch.get_num_threads()} threads; medians of {args.rounds} alternating rounds")
    for name, value in seconds.items():
        print(f"  {name:13s} {value:7.2f} s  {n / value:6.2f} images/s  "
              f"({seconds['one_window'] / value:.2f}x one_window; same confusion counts: {same[name]})")
    split = stage_split(Path(args.workdir))
    print(split or f"no quickstart manifests under {args.workdir} (run `pgseg quickstart` first for the stage split)")
    commit, dirty = commit_state()
    write_record(args.out or REPO / "results" / "eval-cpu.json", {
        "command": "python -m benchmarks.eval " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "commit": commit, "dirty": dirty, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cores} CPU cores", "threads": torch.get_num_threads(), "images": n,
        "image": "500x375 -> 597x448, 2 windows", "seconds": seconds, "all_seconds": times,
        "images_per_s": {k: n / v for k, v in seconds.items()},
        "speedup_over_one_window": {k: seconds["one_window"] / v for k, v in seconds.items()},
        "same_confusion_counts": same, "ray_includes": "actor start and model load"})


if __name__ == "__main__":
    main()
