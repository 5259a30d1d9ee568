"""Serving throughput and latency, side by side in one run: the zero-shot protocol called in this process, one image
after another (``pgseg.segment.segment_image`` and the same answer: mask and overlay PNGs, areas), against
``pgseg serve``'s Ray Serve deployment (one replica holding all the cores, batching on) over HTTP on 127.0.0.1 at
1, 4 and 16 concurrent clients, on the same images and class list. Requests/s and p50/p95 latency per level; ratios against in-process.
The model has random weights of ``--preset`` (what is timed is the same computation whatever the weights).

    python -m benchmarks.serve [--preset tiny] [--images 16] [--size 320x240] [--requests 48]
                               [--out results/serve-cpu.json]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.record import REPO, commit_state, write_record
from pipelines.runtime import use_loopback

use_loopback()  # before Ray is imported

CLASSES = ["circle", "square", "triangle", "star", "ring", "cross"]
LEVELS = (1, 4, 16)


def _images(count: int, width: int, height: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _summary(latencies: list[float], wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"requests": len(ordered), "requests_per_s": len(ordered) / wall,
            "p50_ms": 1e3 * statistics.median(ordered),
            "p95_ms": 1e3 * ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]}


def in_process(model_path: Path, images: list[bytes], requests: int) -> dict[str, float]:
    from pgseg.checkpoint import load_model
    from pgseg.segment import ProtocolSettings, Segmenter, background_threshold, read_image, segment_image

    from pipelines.serve import answer

    model, config = load_model(model_path)
    settings = ProtocolSettings.of(config.eval, background_threshold(None, config.eval))

    def one(data: bytes) -> dict:  # a request's work: decode, the class list's embeddings, the protocol, the answer
        image = read_image(data)  # (mask and overlay PNGs, areas) that the service sends
        labels, result, work = segment_image(Segmenter(model, CLASSES, settings), image)
        return answer(image, (work, result.labels), labels, result.names)

    one(images[0])  # warm-up
    latencies, start = [], time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        one(images[i % len(images)])
        latencies.append(time.perf_counter() - t)
    return _summary(latencies, time.perf_counter() - start)


def over_http(url: str, images: list[bytes], requests: int, concurrency: int) -> dict[str, float]:
    target = f"{url}/segment?classes={','.join(CLASSES)}"

    def one(i: int) -> float:
        t = time.perf_counter()
        request = urllib.request.Request(target, images[i % len(images)], {"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=600) as answer:
            answer.read()
            assert answer.status == 200
        return time.perf_counter() - t

    one(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests)))
    return _summary(latencies, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the images")
    parser.add_argument("--requests", type=int, default=48, help="requests per level")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "results" / "serve-cpu.json"))
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.lower().split("x"))
    import logging

    import torch
    from ray import serve

    from pgseg.checkpoint import save_model
    from pgseg.config import load_config
    from pgseg.model import PGSeg
    from pipelines.runtime import free_port, start_ray
    from pipelines.serve import ServeSettings, deployment, wait_until_healthy

    torch.manual_seed(0)
    config = load_config(args.preset)
    model_path = save_model(PGSeg.from_config(config).eval(), config,
                            Path(tempfile.mkdtemp(prefix="pgseg-serve-bench-")) / "model.safetensors")
    images = _images(args.images, width, height)
    cores = os.cpu_count() or 1
    rows = {"in_process": in_process(model_path, images, args.requests)}
    start_ray(num_cpus=cores, log_to_driver=False, logging_level=logging.ERROR)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(str(model_path), max_batch_size=args.max_batch_size)
    serve.run(deployment(settings, replicas=1, cpus=cores), name="pgseg", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url)
        for level in LEVELS:
            rows[f"serve_concurrency_{level}"] = over_http(url, images, args.requests, level)
        with urllib.request.urlopen(f"{url}/stats", timeout=30) as answer:
            import json

            stats = json.loads(answer.read())
    finally:
        serve.shutdown()
    base = rows["in_process"]["requests_per_s"]
    for name, row in rows.items():
        row["throughput_vs_in_process"] = row["requests_per_s"] / base
        print(f"{name:22s} {row['requests_per_s']:7.2f} requests/s  p50 {row['p50_ms']:7.1f} ms  "
              f"p95 {row['p95_ms']:7.1f} ms  ({row['throughput_vs_in_process']:.2f}x in-process)")
    commit, dirty = commit_state()
    write_record(args.out, {
        "command": "python -m benchmarks.serve " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                           vars(args).items() if k != "out"),
        "commit": commit, "dirty": dirty, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cores} CPU cores", "torch": torch.__version__, "preset": args.preset,
        "image_size": [width, height], "classes": len(CLASSES), "replica_cpus": cores,
        "max_batch_size": args.max_batch_size, "rows": rows, "batch_sizes": stats["batch_sizes"]})


if __name__ == "__main__":
    main()
