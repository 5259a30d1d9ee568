"""The pgseg_vit_s training step (pgseg.train.TrainStep: forward, backward, clipping, AdamW, EMA), side by side in one
run, alternating rounds, medians:

- ``release_way``: our model run the way the released code runs it — attention written out (softmax(QKᵀ/√d)·V, in
  timm's blocks and in ours), the Hungarian matching by SciPy one image at a time with a device→host copy each,
  AdamW's per-parameter loop (torch 1.8's only one), and the text tower over all 77 token columns. The released module itself is not in this repository (we do not
  copy its code); this is the stated stand-in.
- ``ours``: the defaults (fused attention, batched matching, fused AdamW, the text tower cut after the batch's last
  EOT: pgseg.model.text_encoder.used_columns);
- ``ours_compiled``: the same with ``train.compile: true`` (its compile is a warm-up, not timed);
- ``groupvit``: ours without NPR (``groupvit_vit_s``), for what NPR costs against what it adds in FLOPs
  (torch.utils.flop_counter; the solver on the host is not a FLOP it counts).

Ratios both of the medians and as the median of each round's own ratio (paired: robust to a machine whose speed
drifts between rounds, as this shared one does). Writes the times, the ratios and the top operators of one profiled
``ours`` step (with NPR's parts and the optimiser's step as regions, by their record_function names) to
``results/step-<device>.json``.

    python -m benchmarks.step [--batch 16] [--rounds 5] [--variants release_way,ours,ours_compiled,groupvit]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
from datetime import datetime, timezone
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import median, time_call, training_step
from benchmarks.record import REPO, commit_state, write_record

VARIANTS = ("release_way", "ours", "ours_compiled", "groupvit")


def _written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                           **_: object) -> torch.Tensor:
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return torch.nn.functional.dropout(attn.softmax(dim=-1), dropout_p) @ v


def _per_image_scipy(cost: torch.Tensor, maximize: bool = False, ties: str = "scipy") -> tuple[torch.Tensor, ...]:
    from scipy.optimize import linear_sum_assignment

    pairs = [linear_sum_assignment(c.detach().cpu().numpy(), maximize=maximize) for c in cost]
    return tuple(torch.from_numpy(np.stack(x)).to(cost.device) for x in zip(*pairs))


@contextlib.contextmanager
def per_image_matching() -> Iterator[None]:
    """NPR's matching the release's way only: SciPy per image, a device→host copy each."""
    import pgseg.model.npr as npr

    saved = npr.linear_sum_assignment
    npr.linear_sum_assignment = _per_image_scipy
    try:
        yield
    finally:
        npr.linear_sum_assignment = saved


@contextlib.contextmanager
def host_matching() -> Iterator[None]:
    """Matching solved on the host even on a GPU (one copy per batch, lapx or numba), as before the GPU kernel."""
    from pgseg.model import matching

    gpus = {torch.device("cuda", i) for i in range(torch.cuda.device_count())} - matching._NO_GPU_KERNEL
    matching._NO_GPU_KERNEL.update(gpus)
    try:
        yield
    finally:
        matching._NO_GPU_KERNEL.difference_update(gpus)


@contextlib.contextmanager
def release_way() -> Iterator[None]:
    """Build and run models inside this the release's way (see the module's docstring)."""
    import timm.layers

    import pgseg.model.layers as layers
    import pgseg.model.text_encoder as text_encoder
    import pgseg.train.optim as optim
    import pgseg.train.step as step

    def looped_adamw(model, config, global_batch):
        o = config.optim
        return torch.optim.AdamW(optim.parameter_groups(model, o.weight_decay),
                                 lr=optim.scaled_rates(config, global_batch).lr, betas=tuple(o.betas), eps=o.eps,
                                 foreach=False, fused=False)

    saved = (layers.F, step.build_optimizer, text_encoder.used_columns)
    functional = type("F", (), {"scaled_dot_product_attention": staticmethod(_written_out_attention),
                                "__getattr__": lambda self, name: getattr(torch.nn.functional, name)})()
    timm.layers.set_fused_attn(False)  # timm's blocks read it when built
    layers.F, step.build_optimizer = functional, looped_adamw
    text_encoder.used_columns = lambda tokens: tokens.shape[1]  # every column: the release pads captions to 77
    try:
        with per_image_matching():
            yield
    finally:
        layers.F, step.build_optimizer, text_encoder.used_columns = saved
        timm.layers.set_fused_attn(True)


def _build(name: str, batch: int, device: str) -> Callable[[], None]:
    preset = "groupvit_vit_s" if name == "groupvit" else "pgseg_vit_s"
    overrides = ("train.compile=true",) if name == "ours_compiled" else ()
    if name == "release_way":
        with release_way():
            step, _, _ = training_step(preset, batch, overrides, device=device)
            step()  # the warm-up, still the release's way

        def run() -> None:
            with release_way():
                step()
        return run
    step, _, _ = training_step(preset, batch, overrides, device=device)
    step()  # warm-up (the compile of ours_compiled)
    return step


def _flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def step_profile(step: Callable[[], None], device: torch.device, rows: int = 15) -> dict:
    """One step under torch's profiler: the top operators by self device time and by self host time, NPR's regions
    and the optimiser's step (inclusive), and how many host waits the step has (synchronisations, device→host
    copies, scalar reads)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()

    def top(key: str) -> list[dict]:
        ranked = sorted(events, key=lambda e: -getattr(e, key))[:rows]
        return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in ranked]

    waits = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::_local_scalar_dense")
    device_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {"self_device_ms_total": sum(getattr(e, device_key) for e in events) / 1e3,
            "self_host_ms_total": sum(e.self_cpu_time_total for e in events) / 1e3,
            "top_by_device": top(device_key), "top_by_host": top("self_cpu_time_total"),
            "regions": [{"op": e.key, "calls": e.count, "host_ms": e.cpu_time_total / 1e3,
                         "device_ms": getattr(e, "device_time_total", 0) / 1e3}
                        for e in events if e.key.startswith(("npr.", "Optimizer.step"))],
            "host_waits": {e.key: e.count for e in events if e.key in waits}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="default: results/step-<device>.json")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    torch.manual_seed(0)
    steps = {name: _build(name, args.batch, args.device) for name in names}
    flops = {name: _flops(steps[name]) for name in ("ours", "groupvit") if name in steps}
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):  # alternating rounds
        for name, step in steps.items():
            times[name].append(time_call(step))
    seconds = {name: median(t) for name, t in times.items()}
    pairs = [(f"release_way_over_{n}", "release_way", n) for n in ("ours", "ours_compiled")]
    pairs.append(("npr_time_ratio", "ours", "groupvit"))
    pairs = [(key, a, b) for key, a, b in pairs if {a, b} <= set(seconds)]
    ratios = {key: seconds[a] / seconds[b] for key, a, b in pairs}  # of the medians
    # the median of each round's own ratio: a machine whose speed drifts between rounds moves both sides of a round
    paired = {key: median([x / y for x, y in zip(times[a], times[b])]) for key, a, b in pairs}
    if "npr_time_ratio" in ratios:
        ratios["npr_flops_ratio"] = flops["ours"] / flops["groupvit"]
        ratios["npr_time_over_flops"] = ratios["npr_time_ratio"] / ratios["npr_flops_ratio"]
        paired["npr_time_over_flops"] = paired["npr_time_ratio"] / ratios["npr_flops_ratio"]
    for name in names:
        print(f"{name:14s} {seconds[name]:.3f} s/step  {args.batch / seconds[name]:.2f} images/s")
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}" + (f" (median of the rounds' own: {paired[key]:.3f})" if key in paired else ""))
    profile = step_profile(steps["ours"], torch.device(args.device)) if "ours" in steps else None
    commit, dirty = commit_state()
    write_record(args.out or REPO / "results" / f"step-{args.device}.json", {
        "command": "python -m benchmarks.step " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "commit": commit, "dirty": dirty, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "preset": "pgseg_vit_s (groupvit: groupvit_vit_s)", "batch": args.batch, "precision": "fp32",
        "rounds": args.rounds, "seconds_per_step": seconds, "all_seconds": times,
        "images_per_s": {n: args.batch / s for n, s in seconds.items()},
        "flops_per_step": flops, "ratios": {k: v for k, v in ratios.items() if math.isfinite(v)},
        "paired_ratios": {k: v for k, v in paired.items() if math.isfinite(v)},
        "profile_ours": profile})


if __name__ == "__main__":
    main()
