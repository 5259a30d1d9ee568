"""Batched exact matching vs a per-image scipy loop: 1024 problems of 64×64 and of 8×8 (CPU).

    python -m benchmarks.matching [--repeats 5]
Prints both times and the ratio; asserts the assignments are identical.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from benchmarks.common import median, time_call
from pgseg.model.matching import linear_sum_assignment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"threads: {torch.get_num_threads()}")
    for n in (64, 8):
        cost = torch.randn(args.batch, n, n)
        linear_sum_assignment(cost)  # compile / warm up
        ours, loop = [], []
        for _ in range(args.repeats):  # alternate the two in one run
            ours.append(time_call(lambda: linear_sum_assignment(cost)))
            loop.append(time_call(lambda: [scipy_lsa(c) for c in cost.double().numpy()]))
        _, cols = linear_sum_assignment(cost)
        ref = np.stack([scipy_lsa(c)[1] for c in cost.double().numpy()])
        assert np.array_equal(cols.numpy(), ref), "assignments differ from scipy"
        print(f"{args.batch} x {n}x{n}: ours {median(ours) * 1e3:.1f} ms, scipy loop {median(loop) * 1e3:.1f} ms, "
              f"speed-up {median(loop) / median(ours):.2f}x (assignments identical)")


if __name__ == "__main__":
    main()
