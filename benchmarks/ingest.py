"""Ray Data ingest vs a plain webdataset + torch DataLoader pipeline doing the same decode/augment/tokenise on the
same shards with the same number of CPU processes, alternating in one run; plus the download stage's images/s
from a loopback HTTP server.

    python -m benchmarks.ingest [--images 4000] [--workers 2] [--rounds 2]
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import median  # noqa: E402

SIZE, CONTEXT, BATCH = 64, 16, 64


def _plain_pipeline(shards: list[str], workers: int):
    import webdataset as wds

    from pgseg.text import tokenize
    from pipelines.data.ingest import preprocess_image

    rng_holder: dict[int, np.random.Generator] = {}

    def prep(sample):
        rng = rng_holder.setdefault(os.getpid(), np.random.default_rng())
        image = preprocess_image(sample[0], SIZE, 0.08, True, rng)
        return torch.from_numpy(image), tokenize([sample[1].decode()], CONTEXT)[0]

    dataset = wds.WebDataset(shards, shardshuffle=False).to_tuple("jpg;png", "txt").map(prep)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers)


def _time(batches) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch["image"] if isinstance(batch, dict) else batch[0])
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import ray

    from pipelines.data.download import DownloadSpec, download
    from pipelines.data.ingest import Ingest
    from pipelines.data.file_server import serve_directory
    from pipelines.data.shapes_world import ShapesWorld, write_train_images, write_url_list

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = write_train_images(ShapesWorld(image_size=SIZE), root / "www", args.images)
        with serve_directory(root / "www") as base:
            write_url_list(rows, base, root / "urls")
            start = time.perf_counter()
            manifest = download(root / "urls", root / "shards",
                                DownloadSpec(image_size=SIZE, number_sample_per_shard=500,
                                             processes_count=args.workers, thread_count=16))
            dl = time.perf_counter() - start
        print(f"download: {manifest['samples']} images in {dl:.1f} s = {manifest['samples'] / dl:.0f} images/s "
              f"({args.workers} processes, loopback HTTP)")
        shards = sorted(str(p) for p in (root / "shards").glob("*.tar"))
        start_ray(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ingest = Ingest([shards], img_size=SIZE, context_length=CONTEXT, train=True)
        ray_t, plain_t = [], []
        for r in range(args.rounds + 1):  # the first round warms both up and is not counted
            t_ray, n_ray = _time(ingest.dataset(r).iter_torch_batches(batch_size=BATCH))
            t_plain, n_plain = _time(_plain_pipeline(shards, args.workers))
            assert n_ray == n_plain == manifest["samples"], (n_ray, n_plain)
            if r:
                ray_t.append(t_ray)
                plain_t.append(t_plain)
        ray_ips, plain_ips = n_ray / median(ray_t), n_plain / median(plain_t)
        print(f"ingest (decode + RandomResizedCrop + flip + normalise + tokenise, {SIZE}px, {args.workers} CPUs): "
              f"Ray Data {ray_ips:.0f} images/s, webdataset+DataLoader {plain_ips:.0f} images/s, "
              f"ratio {ray_ips / plain_ips:.2f} (goal >= 0.9)")
        ray.shutdown()


if __name__ == "__main__":
    main()
