"""Batched exact matching, side by side in one run: the release's way (SciPy per image, a device→host copy each),
our two solvers (``ties="scipy"``: SciPy's algorithm compiled with numba, its ties; ``ties="any"``: lapx's batched
Jonker-Volgenant; on a GPU, torch-linear-assignment's kernel) and torch-linear-assignment itself (PyPI; SciPy per
image on a CPU, a Triton kernel on a GPU), for batches of 16, 256 and 1024 cost matrices of 8×8 and 64×64. Every
solver's assignments are checked against SciPy's before its time counts (continuous random costs: one optimum), and
on ±1 costs (many optima, as T-NPR's) its totals against SciPy's optimum. Medians of alternating rounds; ratios
are the release way's time over each solver's.

    python -m benchmarks.matching [--repeats 5] [--device cpu|cuda] [--out results/matching-cpu.json]
"""
from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from benchmarks.common import median, time_call
from benchmarks.record import REPO, commit_state, write_record
from pgseg.model.matching import linear_sum_assignment

BATCHES = (16, 256, 1024)
SIZES = (8, 64)


def _solvers(cost: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Each solver as a call returning [B, R] columns on the host."""

    def release_way() -> torch.Tensor:
        return torch.from_numpy(np.stack([scipy_lsa(c.detach().cpu().numpy())[1] for c in cost]))

    solvers = {"scipy_per_image": release_way,
               "ours_scipy_ties": lambda: linear_sum_assignment(cost, ties="scipy")[1].cpu(),
               "ours_any": lambda: linear_sum_assignment(cost, ties="any")[1].cpu()}
    try:
        from torch_linear_assignment import batch_linear_assignment
    except ImportError:  # an optional comparison (the test extra installs it)
        return solvers
    solvers["torch_linear_assignment"] = lambda: batch_linear_assignment(cost).cpu()
    return solvers


def optimal_on_ties(cost: torch.Tensor) -> dict[str, bool]:
    """Costs with many equal optima (±1, the released T-NPR's): for each solver, whether every answer is a
    permutation whose total is SciPy's optimum (which optimum it picks may differ)."""
    host = cost.cpu()

    def total(cols: torch.Tensor) -> torch.Tensor:
        return host.gather(2, cols.cpu()[..., None]).sum(dim=(1, 2))

    solvers = _solvers(cost)
    best = total(solvers["scipy_per_image"]())
    columns = torch.arange(cost.shape[2])
    return {name: bool(torch.equal(total(cols := solve()), best)
                       and (cols.cpu().sort(dim=1).values == columns).all())
            for name, solve in solvers.items()}


def compare(device: torch.device, batches=BATCHES, sizes=SIZES, repeats: int = 5) -> list[dict]:
    """One row per (batch, size): each solver's median seconds, whether it gave SciPy's assignments (random costs:
    one optimum) and an optimum on ±1 costs (many), and the release way's time over its own."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        for batch in batches:
            cost = torch.rand(batch, size, size, generator=generator, dtype=torch.float64).to(device)
            solvers = _solvers(cost)
            reference = solvers["scipy_per_image"]()
            same = {}
            for name, solve in solvers.items():  # also the warm-up (numba compiles, Triton builds its kernel)
                same[name] = bool(torch.equal(solve(), reference))

            def timed(solve: Callable[[], torch.Tensor]) -> float:
                def call() -> None:
                    solve()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                return time_call(call)

            times: dict[str, list[float]] = {name: [] for name in solvers}
            for _ in range(repeats):  # alternating rounds
                for name, solve in solvers.items():
                    times[name].append(timed(solve))
            seconds = {name: median(t) for name, t in times.items()}
            signs = torch.sign(torch.randn(batch, size, size, generator=generator, dtype=torch.float64))
            rows.append({"batch": batch, "size": size, "seconds": seconds, "same_as_scipy": same,
                         "optimal_on_ties": optimal_on_ties(signs.to(device)),
                         "speedup_over_scipy_per_image": {name: seconds["scipy_per_image"] / s
                                                          for name, s in seconds.items()
                                                          if name != "scipy_per_image"}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="default: results/matching-<device>.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = compare(device, repeats=args.repeats)
    for row in rows:
        ratios = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in row["speedup_over_scipy_per_image"].items())
        wrong = [name for name, ok in row["same_as_scipy"].items() if not ok]
        wrong += [f"{name} (ties)" for name, ok in row["optimal_on_ties"].items() if not ok]
        print(f"{row['batch']:5d} x {row['size']}x{row['size']}: scipy per image "
              f"{row['seconds']['scipy_per_image'] * 1e3:.2f} ms; speed-up {ratios}"
              + (f"; NOT SciPy's assignments: {', '.join(wrong)}" if wrong else ""))
    commit, dirty = commit_state()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    write_record(args.out or REPO / "results" / f"matching-{device.type}.json",
                 {"command": "python -m benchmarks.matching " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                          if v is not None),
                  "commit": commit, "dirty": dirty, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "device": name, "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
