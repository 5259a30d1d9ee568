"""Images/s of a pgseg_vit_s training step (pgseg.train.TrainStep: forward, backward, clipping, AdamW, EMA) at batch 16,
fp32, CPU.

    python -m benchmarks.step [--batch 16] [--steps 3]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import median, time_call, training_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="pgseg_vit_s")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    step, _, _ = training_step(args.preset, args.batch)
    step()  # warm-up
    times = [time_call(step) for _ in range(args.steps)]
    t = median(times)
    print(f"{args.preset} batch {args.batch} fp32 on {torch.get_num_threads()} CPU threads: "
          f"{t:.2f} s/step, {args.batch / t:.2f} images/s (median of {args.steps})")


if __name__ == "__main__":
    main()
