"""What NPR costs: training-step time of pgseg_vit_s vs groupvit_vit_s (224², batch 16, fp32, CPU), alternating in
one run, against the FLOPs ratio counted by torch.utils.flop_counter. Goal: time ratio within 5 % of FLOPs ratio.

    python -m benchmarks.npr_overhead [--batch 16] [--rounds 3]
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import median, time_call, training_step


def _flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    steps = {name: training_step(name, args.batch)[0] for name in ("pgseg_vit_s", "groupvit_vit_s")}
    flops = {name: _flops(step) for name, step in steps.items()}  # also the warm-up step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_call(step))
    t = {name: median(v) for name, v in times.items()}
    time_ratio = t["pgseg_vit_s"] / t["groupvit_vit_s"]
    flop_ratio = flops["pgseg_vit_s"] / flops["groupvit_vit_s"]
    for name in steps:
        print(f"{name}: {t[name]:.2f} s/step ({args.batch / t[name]:.2f} img/s), {flops[name] / 1e12:.3f} TFLOP/step")
    print(f"time ratio {time_ratio:.3f}, FLOPs ratio {flop_ratio:.3f}, "
          f"time/FLOPs {time_ratio / flop_ratio:.3f} (goal: within 1.05)")


if __name__ == "__main__":
    main()
