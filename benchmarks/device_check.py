"""One call on a GPU machine: does the code run there and give the released numbers, and how fast is it.

    python -m benchmarks.device_check [--fixture DIR] [--out results/device_check-<gpu>.json] [--batch 128]

1. parity on the device (float32, TF32 off): the released fixture's model — embeddings against ``outputs.pt`` and
   the zero-shot protocol against ``segmentation.pt`` (labels that agree, max |Δ| of probabilities, 60 cases);
2. the paper-size training step (the trainer's pgseg.train.TrainStep: pgseg_vit_s at 224, bf16 autocast, clipping,
   AdamW with its schedule, prototype EMA): images/s, FLOPs per step, MFU and peak memory with NPR in official mode,
   in paper mode (also compiled, with its matching on the host, and with the release's per-image SciPy matching),
   and without NPR (GroupViT), in alternating rounds; a profile of one paper step;
3. exact matching of 256 and 1024 cost matrices of 64×64 on the device (``benchmarks.matching.compare``: the
   release's SciPy per image with a copy each, our two solvers, torch-linear-assignment's GPU kernel), the same
   batch from host memory beside it, assignments checked against SciPy's;
4. one Ray Train worker against a plain loop of the same step (shapes-world shards at 224 made here by img2dataset);
5. the zero-shot protocol on a 500×375 image (VOC's usual size) with VOC's 20 classes: seconds per image.

Each part is timed after a warm-up; a part that fails records its error and the others still run. The figures go to
``--out`` as JSON (command, commit, date, device, numbers), written again after each part.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from benchmarks.record import write_record
from benchmarks.step import step_profile

REPO = Path(__file__).resolve().parents[1]
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
               "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (each waited for on the device) after one warm-up call."""
    from benchmarks.common import median, time_call

    def call() -> None:
        fn()
        _sync(device)

    call()
    return median([time_call(call) for _ in range(repeats)])


def parity(fixture: Path, device: torch.device) -> dict:
    from benchmarks.fixture import IMAGES, Reference
    from pgseg.checkpoint import convert_checkpoint
    from pgseg.segment import ProtocolSettings, Segmenter

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model, _, report = convert_checkpoint(fixture / "released_layout_small.pth", "pgseg-official")
    if not report.ok:
        raise RuntimeError(report.text())
    model = model.to(device).eval()
    inputs, outputs = torch.load(fixture / "inputs.pt"), torch.load(fixture / "outputs.pt")
    embed = {}
    with torch.no_grad():
        for name, key in (("img224", "images_224"), ("img448", "images_448")):
            emb = model.encode_image(inputs[key].to(device))
            for suffix, ours in (("image_x", emb.x), ("group_feat", emb.groups), ("pooled", emb.out.pooled)):
                ref = outputs[f"{name}.{suffix}"]
                embed[f"{name}.{suffix}"] = (ours.cpu().reshape(ref.shape) - ref).abs().max().item()
    reference = Reference.load(fixture)
    agree, worst = [], 0.0
    for lst, names, setting, bg in reference.lists():
        segmenter = Segmenter(model, names, ProtocolSettings(bg_thresh=bg))
        for image in IMAGES:
            pixels, size = reference.image(image)
            result = segmenter.segment(pixels, size)
            fraction, diff = reference.compare(image, lst, setting, result.labels, result.probs)
            agree.append(fraction)
            worst = max(worst, diff)
    return {"embedding_max_abs_diff": embed, "segmentation_cases": len(agree),
            "labels_agree_min_percent": 100 * min(agree), "labels_agree_mean_percent": 100 * sum(agree) / len(agree),
            "probs_max_abs_diff": worst}


# dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), for MFU; other devices: no MFU
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def training_steps(device: torch.device, batch: int, repeats: int) -> dict:
    """The paper-size step at bf16: NPR official and paper, paper compiled, paper with its matching solved on the
    host (lapx after a copy, no GPU kernel), paper with the release's per-image SciPy matching, and GroupViT;
    images/s, FLOPs per step (torch's counter: a host solve is not counted), MFU, the memory a variant adds at its
    peak. Every variant is built and warmed up first, then timed in alternating rounds (medians), so the GPU's clocks
    and caches treat them alike; one paper step is profiled (top operators by device and by host time)."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import median, time_call, training_step
    from benchmarks.step import host_matching, per_image_matching

    rows: dict[str, dict] = {}
    steps: dict[str, tuple[Callable[[], None], Callable]] = {}
    peak = peak_flops(device)
    variants = (("pgseg_official", "pgseg_vit_s", ("npr.mode=official",), contextlib.nullcontext),
                ("pgseg_paper", "pgseg_vit_s", ("npr.mode=paper",), contextlib.nullcontext),
                ("pgseg_paper_compiled", "pgseg_vit_s", ("npr.mode=paper", "train.compile=true"),
                 contextlib.nullcontext),
                ("pgseg_paper_host_matching", "pgseg_vit_s", ("npr.mode=paper",), host_matching),
                ("pgseg_paper_per_image_scipy", "pgseg_vit_s", ("npr.mode=paper",), per_image_matching),
                ("groupvit_no_npr", "groupvit_vit_s", (), contextlib.nullcontext))
    for name, preset, overrides, switch in variants:
        try:
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with switch():
                step, _, _ = training_step(preset, batch, overrides, device=device, precision="bf16")
                step()  # warm-up (a compile)
                with FlopCounterMode(display=False) as counter:
                    step()
                _sync(device)
            steps[name] = (step, switch)
            flops = counter.get_total_flops()
            rows[name] = {"flops_per_step": flops, "peak_memory_gib": (
                (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30 if device.type == "cuda" else None)}
        except Exception as exc:  # noqa: BLE001 - a variant that fails (e.g. no compiler) must not lose the others
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}

    def run(name: str) -> float:
        step, switch = steps[name]

        def call() -> None:
            with switch():
                step()
            _sync(device)
        return time_call(call)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # alternating rounds
        for name in steps:
            times[name].append(run(name))
    for name, t in times.items():
        seconds = median(t)
        flops = rows[name]["flops_per_step"]
        rows[name].update(seconds_per_step=seconds, images_per_s=batch / seconds,
                          mfu=flops / seconds / peak if peak else None)
    base = rows["groupvit_no_npr"].get("seconds_per_step")
    for row in rows.values():
        if base and "seconds_per_step" in row:
            row["time_vs_groupvit"] = row["seconds_per_step"] / base
    profile = step_profile(steps["pgseg_paper"][0], device) if "pgseg_paper" in steps else None
    return {"batch": batch, "img_size": 224, "precision": "bf16", "peak_flops": peak, "rounds": repeats,
            "steps": rows, "profile_pgseg_paper": profile}


def ray_train_step(device: torch.device, batch: int, steps: int) -> dict:
    """One worker on Ray Train (Ray Data reading shapes-world shards at 224, made by img2dataset here) against the
    same TrainStep in a plain loop that decodes its own batches: images/s and the step's own seconds."""
    import logging
    import os
    import tempfile

    import ray

    from benchmarks.train_scaling import make_shards, plain_process, ray_train
    from pgseg.config import load_config
    from pipelines.runtime import start_ray

    root = Path(tempfile.mkdtemp(prefix="pgseg-device-train-"))
    shards = make_shards(root, batch * (steps + 8), image_size=224)
    config = load_config("pgseg_vit_s", [f"data.shards=[{shards}]", f"data.batch_size={batch}", "data.img_size=224"])
    plain = plain_process(config, shards, steps, device=device.type)
    start_ray(num_cpus=os.cpu_count(), log_to_driver=False, logging_level=logging.ERROR)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        on_ray = ray_train(config, steps, 1, root, use_gpu=device.type == "cuda")
    finally:
        ray.shutdown()
    step = {name: r["time/compute"] + r["time/optim"] for name, r in (("plain", plain), ("ray", on_ray))}
    return {"batch": batch, "steps": steps, "precision": "auto", "plain_loop": plain, "ray_train_1_worker": on_ray,
            "ray_over_plain_images_per_s": on_ray["images_per_s"] / plain["images_per_s"],
            "ray_over_plain_step_seconds": step["ray"] / step["plain"]}


def matching(device: torch.device, repeats: int) -> dict:
    from benchmarks.matching import compare

    rows = compare(device, batches=(256, 1024), sizes=(64,), repeats=repeats)
    if device.type == "cuda":  # the same problems from host memory: what the copy to the host costs
        rows += [{**row, "from_host": True} for row in compare(torch.device("cpu"), batches=(256,), sizes=(64,),
                                                                 repeats=repeats)]
    return {"rows": rows}


def segmentation_speed(device: torch.device, repeats: int, images: int = 16) -> dict:
    """The protocol on ``images`` 500×375 images (2 windows each), VOC's 20 classes, random weights: one window per
    forward pass, one image's windows together, and all the images' windows in passes of 32; images/s of each, how
    many pixels' labels differ from the one-window path and the largest difference of the probabilities. Batched
    matrix products may sum in another order (float noise); the protocol's discrete steps (each pixel's argmax group,
    each group's background test, the top-5 classes) can turn such noise into another label where a decision is
    nearly tied, and random weights make near-ties common (the released fixture's test is exact on all paths)."""
    import numpy as np

    from pgseg.config import load_config
    from pgseg.model import PGSeg
    from pgseg.segment import ProtocolSettings, Segmenter, protocol_input

    model = PGSeg.from_config(load_config("pgseg_vit_s", ["npr.mode=official"])).to(device).eval()
    settings = ProtocolSettings(bg_thresh=0.95)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(images)]
    inputs = [(protocol_input(a, settings), (375, 500), None) for a in arrays]
    paths = {"one_window": (Segmenter(model, VOC_CLASSES, settings, batch=1), 1),
             "one_image": (Segmenter(model, VOC_CLASSES, settings, batch=8), 1),
             "all_images_32_windows": (Segmenter(model, VOC_CLASSES, settings, batch=32), images)}

    def run(segmenter: Segmenter, per_call: int) -> list:
        return [r for start in range(0, images, per_call) for r in segmenter.segment_many(inputs[start:start + per_call])]

    reference = run(*paths["one_window"])
    out = {"image": "375x500 -> 448x597 (2 windows)", "classes": len(VOC_CLASSES), "images": images,
           "pixels": images * 375 * 500}
    for name, (segmenter, per_call) in paths.items():
        results = run(segmenter, per_call)
        differing = sum(int((r.labels != ref.labels).sum()) for r, ref in zip(results, reference))
        probs_diff = max(float((r.probs - ref.probs).abs().max()) for r, ref in zip(results, reference))
        seconds = _timed(lambda: run(segmenter, per_call), device, repeats) / images
        out[name] = {"seconds_per_image": seconds, "images_per_s": 1 / seconds, "same_labels": differing == 0,
                     "pixels_differing": differing, "probs_max_abs_diff": probs_diff}
    out["seconds_per_image"] = out["one_image"]["seconds_per_image"]  # the figure earlier checks reported
    return out


PARTS = ("parity", "training_step", "matching", "ray_train_step", "segmentation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default=str(REPO.parent / "shared" / "reference" / "released_fixture"))
    parser.add_argument("--out", default=None, help="default: results/device_check-<gpu>.json (e.g. -h200; -cpu)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=20, help="steps of the Ray Train vs plain loop part")
    parser.add_argument("--commit", default=None, help="the commit measured (default: git's HEAD here; a copied "
                        "working tree on a device machine may not carry the repository)")
    parser.add_argument("--parts", default=",".join(PARTS), help="the parts to run, comma-separated")
    args = parser.parse_args()
    chosen = [p for p in args.parts.split(",") if p]
    if not chosen or set(chosen) - set(PARTS):
        parser.error(f"--parts: choose among {', '.join(PARTS)}; got {args.parts!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip()
    result = {"command": "python -m benchmarks.device_check " + " ".join(sys.argv[1:]), "commit": commit or None,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version()}
    parts = {"parity": lambda: parity(Path(args.fixture), device),
             "training_step": lambda: training_steps(device, args.batch, args.repeats),
             "matching": lambda: matching(device, args.repeats),
             "ray_train_step": lambda: ray_train_step(device, args.batch, args.train_steps),
             "segmentation": lambda: segmentation_speed(device, args.repeats)}
    tag = torch.cuda.get_device_name(device).split()[-1].lower() if device.type == "cuda" else "cpu"
    out = args.out or REPO / "results" / f"device_check-{tag}.json"
    for name, part in ((n, parts[n]) for n in PARTS if n in chosen):
        start = time.perf_counter()
        try:
            result[name] = part()
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        result[name]["wall_s"] = time.perf_counter() - start
        print(name, json.dumps(result[name], indent=1), flush=True)
        write_record(out, result)  # after each part: a run stopped at its time limit keeps what it measured


if __name__ == "__main__":
    main()
