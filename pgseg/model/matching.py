"""Batched exact linear assignment, one call per batch (never a Python loop over images, never a host sync per
image: a GPU batch is copied to the host once), in two flavours:

- ``ties="scipy"``: the shortest-augmenting-path algorithm that ``scipy.optimize.linear_sum_assignment`` runs (Crouse
  2016), compiled with numba and spread over the cores (``prange``). It returns what scipy returns, ties included:
  the released code's T-NPR cost matrices are all ±1, so official mode needs scipy's choice among equal optima.
- ``ties="any"``: an optimal assignment by lapx's batched Jonker-Volgenant solver (``lap.lapjvr_batch``, native
  threads). Where the optimum is unique it is scipy's; among equal optima it may pick another (paper mode only asks
  for an optimal one). Faster per core than scipy's algorithm (``python -m benchmarks.matching``).

On a GPU, ``ties="any"`` is solved where the costs are, by torch-linear-assignment's batched Triton kernel (one
program per problem; the ``gpu`` extra installs it), when it is installed and runs on that GPU; else on the host as
above. Measured on an H200 (``results/device_check-h200.json``): 256 problems of 64×64 in 1.5 ms (1024 in 1.7 ms)
against 41 ms (173 ms) for the release's SciPy loop, SciPy's assignments on continuous costs and optimal ones on ±1
costs; the paper-mode training step at batch 128 took 0.100 s against 0.112 s with the matching on the host. A
lock-step GPU version of SciPy's search (one kernel sequence per augmenting step) had taken 0.92 s for 256 problems,
so ``ties="scipy"`` stays on the host.
"""
from __future__ import annotations

import os
import warnings

import numba

if os.environ.get("NUMBA_THREADING_LAYER") is None:
    # numba's OpenMP layer would reset the process-wide OpenMP thread count that torch also uses (a 1-CPU Ray
    # worker would then run torch on every core); the workqueue layer keeps to itself
    numba.config.THREADING_LAYER = "workqueue"

from typing import Literal  # noqa: E402

import lap  # noqa: E402  (lapx)
import numpy as np  # noqa: E402
import torch  # noqa: E402


@numba.njit(cache=True, nogil=True)
def _solve_one(cost: np.ndarray, col4row: np.ndarray) -> None:  # pragma: no cover - compiled
    """One [nr, nc] problem (nr <= nc) in place into col4row: scipy's steps, its scan order and tie-breaking."""
    nr, nc = cost.shape
    c = cost - cost.min()
    u = np.zeros(nr)
    v = np.zeros(nc)
    spc = np.empty(nc)
    path = np.full(nc, -1, np.int64)
    row4col = np.full(nc, -1, np.int64)
    rem = np.empty(nc, np.int64)
    sr = np.zeros(nr, np.bool_)
    sc = np.zeros(nc, np.bool_)
    col4row[:] = -1
    for cur in range(nr):
        for k in range(nc):
            rem[k] = nc - k - 1
        sr[:] = False
        sc[:] = False
        spc[:] = np.inf
        nrem = nc
        i = cur
        min_val = 0.0
        sink = -1
        while sink == -1:
            index = -1
            lowest = np.inf
            sr[i] = True
            ci = c[i]
            ui = u[i]
            for it in range(nrem):
                j = rem[it]
                r = min_val + ci[j] - ui - v[j]  # scipy's order of operations: its rounding, its ties
                s = spc[j]
                if r < s:
                    path[j] = i
                    spc[j] = r
                    s = r
                if s < lowest or (s == lowest and row4col[j] == -1):
                    lowest = s
                    index = it
            min_val = lowest
            j = rem[index]
            if row4col[j] == -1:
                sink = j
            else:
                i = row4col[j]
            sc[j] = True
            nrem -= 1
            rem[index] = rem[nrem]
        u[cur] += min_val
        for k in range(nr):
            if sr[k] and k != cur:
                u[k] += min_val - spc[col4row[k]]
        for j in range(nc):
            if sc[j]:
                v[j] -= min_val - spc[j]
        j = sink
        while True:
            i = path[j]
            row4col[j] = i
            previous = col4row[i]
            col4row[i] = j
            j = previous
            if i == cur:
                break


@numba.njit(cache=True, parallel=True, nogil=True)
def _solve_batch_cpu(cost: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty((cost.shape[0], cost.shape[1]), np.int64)
    for b in numba.prange(cost.shape[0]):
        _solve_one(cost[b], out[b])
    return out


@numba.njit(cache=True, nogil=True)
def _solve_batch_serial(cost: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty((cost.shape[0], cost.shape[1]), np.int64)  # the parallel loop's scheduling costs more than
    for b in range(cost.shape[0]):  # a small batch's solve
        _solve_one(cost[b], out[b])
    return out


Ties = Literal["scipy", "any"]
SERIAL_BELOW = 1 << 18  # entries × the smaller side: below it, one thread (measured: benchmarks.matching)


def linear_sum_assignment(cost: torch.Tensor, maximize: bool = False,
                          ties: Ties = "scipy") -> tuple[torch.Tensor, torch.Tensor]:
    """An exact assignment for each matrix of a batch.

    Args:
        cost: [B, R, C] (or [R, C]); any float dtype, solved in float64 like scipy.
        maximize: maximise the total instead of minimising it.
        ties: ``"scipy"``: what ``scipy.optimize.linear_sum_assignment`` returns, ties included; ``"any"``: an
            optimal assignment (the same where the optimum is unique), faster.
    Returns:
        (rows, cols), each [B, min(R, C)] long, rows ascending: row ``rows[b, k]`` is paired with ``cols[b, k]``.
    """
    if ties not in ("scipy", "any"):
        raise ValueError(f"linear_sum_assignment: ties must be 'scipy' or 'any', got {ties!r}")
    if cost.ndim == 2:
        rows, cols = linear_sum_assignment(cost[None], maximize, ties)
        return rows[0], cols[0]
    if cost.ndim != 3:
        raise ValueError(f"linear_sum_assignment: expected [B, R, C], got shape {tuple(cost.shape)}")
    b, nr, nc = cost.shape
    dev = cost.device
    transposed = nc < nr
    if ties == "any" and dev.type == "cuda" and dev not in _NO_GPU_KERNEL:
        work = cost.detach().to(torch.float64)
        if not bool(torch.isfinite(work).all()):
            raise ValueError("linear_sum_assignment: the cost matrix contains NaN or infinite entries")
        solved = _solve_on_gpu(-work if maximize else work)
        if solved is not None:
            return solved
    work = cost.detach().transpose(1, 2) if transposed else cost.detach()
    work = work.to("cpu", torch.float64).numpy()  # one device→host copy for the whole batch
    work = np.ascontiguousarray(-work if maximize else work)
    if not np.isfinite(work).all():
        raise ValueError("linear_sum_assignment: the cost matrix contains NaN or infinite entries")
    if work.size == 0:
        empty = torch.zeros(b, 0, dtype=torch.long, device=dev)
        return empty, empty.clone()
    # as many threads as torch may use here (a Ray worker with 1 CPU gets 1: idle pool threads would spin), and
    # one for a batch too small to be worth a thread pool's start-up
    threads = max(1, torch.get_num_threads()) if work.size * min(nr, nc) >= SERIAL_BELOW else 1
    if ties == "scipy":
        if threads == 1:
            found = _solve_batch_serial(work)
        else:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            found = _solve_batch_cpu(work)
    else:
        _, cols = lap.lapjvr_batch(work, extend_cost=True, return_cost=False, n_threads=threads)
        found = np.stack(cols)
    rows, cols = np.broadcast_to(np.arange(found.shape[1]), found.shape), found  # [B, min(R, C)]
    if transposed:  # solved as [B, C, R]: found holds the rows of the columns in order; list them by row
        order = found.argsort(axis=1)
        rows, cols = np.take_along_axis(found, order, 1), np.take_along_axis(rows, order, 1)
    return torch.from_numpy(np.ascontiguousarray(rows)).to(dev), torch.from_numpy(np.ascontiguousarray(cols)).to(dev)


_NO_GPU_KERNEL: set[torch.device] = set()  # GPUs where torch-linear-assignment has no kernel (it would loop SciPy)


def _solve_on_gpu(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Minimal assignments of a finite float64 batch [B, R, C] on its GPU by torch-linear-assignment's Triton kernel
    (no host copy); None where it is not installed or has no kernel for this GPU (the caller solves on the host)."""
    try:
        from torch_linear_assignment import batch_linear_assignment
    except ImportError:
        _NO_GPU_KERNEL.add(cost.device)
        return None
    # its fallback is SciPy per image after a copy, announced by a warning; Triton launches on the current device
    with warnings.catch_warnings(record=True) as caught, torch.cuda.device(cost.device):
        warnings.simplefilter("always", RuntimeWarning)
        found = batch_linear_assignment(cost)
    if any(issubclass(w.category, RuntimeWarning) for w in caught):
        _NO_GPU_KERNEL.add(cost.device)  # this answer is right; later batches go to the faster host solvers
    return assignment_pairs(found, cost.shape[2])


def assignment_pairs(found: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's column [B, R] (-1: row left unassigned, when R > C) → (rows, cols) [B, min(R, C)], rows ascending,
    without a host sync."""
    b, nr = found.shape
    if nr <= columns:
        return torch.arange(nr, device=found.device).expand(b, nr).contiguous(), found
    rows = torch.sort((found < 0).to(torch.uint8), dim=1, stable=True).indices[:, :columns]  # assigned rows, in order
    return rows, found.gather(1, rows)
