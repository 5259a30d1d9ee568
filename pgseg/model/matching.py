"""Batched exact linear assignment: the shortest-augmenting-path algorithm that
``scipy.optimize.linear_sum_assignment`` runs (Crouse 2016, scipy's tie-breaking included), advanced for every
problem of a batch at once with tensor operations.

Why not call scipy per image: that is a Python loop over the batch, with a device→host copy and sync per image.
Two backends of the one algorithm, chosen by the tensor's device:
- CPU: the search compiled with numba, the batch spread over the cores (``prange``), one call per batch;
- GPU: the whole batch moves in lock-step with tensor operations over [B, n], so nothing is copied per image and
  the only host syncs are the per-step "is anyone still searching" checks.
Both return what scipy returns, ties included (the released code's T-NPR cost matrices are all ±1).
"""
from __future__ import annotations

import os

import numba

if os.environ.get("NUMBA_THREADING_LAYER") is None:
    # numba's OpenMP layer would reset the process-wide OpenMP thread count that torch also uses (a 1-CPU Ray
    # worker would then run torch on every core); the workqueue layer keeps to itself
    numba.config.THREADING_LAYER = "workqueue"

import numpy as np  # noqa: E402
import torch  # noqa: E402

_INF = float("inf")


def _solve_wide(cost: torch.Tensor) -> torch.Tensor:
    """Min-cost assignment for [B, nr, nc] float64 with nr <= nc, in lock-step; returns col4row [B, nr]."""
    b, nr, nc = cost.shape
    dev = cost.device
    batch = torch.arange(b, device=dev)
    cost = cost - cost.flatten(1).min(dim=1).values[:, None, None]  # non-negative, as scipy does
    u = torch.zeros(b, nr, dtype=cost.dtype, device=dev)
    v = torch.zeros(b, nc, dtype=cost.dtype, device=dev)
    col4row = torch.full((b, nr), -1, dtype=torch.long, device=dev)
    row4col = torch.full((b, nc), -1, dtype=torch.long, device=dev)
    path = torch.full((b, nc), -1, dtype=torch.long, device=dev)
    row_ids = torch.arange(nr, device=dev)
    # scan order of the columns not yet reached: scipy fills it in reverse and removes by swap-with-last
    rem0 = torch.arange(nc - 1, -1, -1, device=dev).expand(b, nc)
    pos0 = torch.arange(nc - 1, -1, -1, device=dev).expand(b, nc)  # pos[j] = index of column j in rem
    for cur in range(nr):
        spc = torch.full((b, nc), _INF, dtype=cost.dtype, device=dev)  # shortest path costs
        sr = torch.zeros(b, nr, dtype=torch.bool, device=dev)
        sc = torch.zeros(b, nc, dtype=torch.bool, device=dev)
        rem, pos = rem0.clone(), pos0.clone()
        nrem = torch.full((b,), nc, dtype=torch.long, device=dev)
        i = torch.full((b,), cur, dtype=torch.long, device=dev)
        min_val = torch.zeros(b, dtype=cost.dtype, device=dev)
        sink = torch.full((b,), -1, dtype=torch.long, device=dev)
        active = torch.ones(b, dtype=torch.bool, device=dev)
        for _ in range(nc):  # each step reaches one new column, so nc steps always suffice
            sr[batch, i] |= active
            r = min_val[:, None] + cost[batch, i] - u[batch, i][:, None] - v  # [B, nc]
            improve = active[:, None] & ~sc & (r < spc)
            path = torch.where(improve, i[:, None], path)
            spc = torch.where(improve, r, spc)
            # the cheapest remaining column; among equals the last free one in scan order, else the first one
            lowest = torch.where(sc, _INF, spc).min(dim=1).values  # [B]
            cand = ~sc & (spc == lowest[:, None])
            free = cand & (row4col < 0)
            j_free = torch.where(free, pos, -1).argmax(dim=1)
            j_first = torch.where(cand, pos, nc).argmin(dim=1)
            j = torch.where(free.any(dim=1), j_free, j_first)  # [B]
            min_val = torch.where(active, lowest, min_val)
            owner = row4col[batch, j]
            reached_sink = active & (owner < 0)
            sink = torch.where(reached_sink, j, sink)
            i = torch.where(active & ~reached_sink, owner, i)
            sc[batch, j] |= active
            index = pos[batch, j]
            last = rem[batch, (nrem - 1).clamp(min=0)]
            rem[batch, index] = torch.where(active, last, rem[batch, index])
            pos[batch, last] = torch.where(active, index, pos[batch, last])
            nrem = nrem - active.long()
            active = active & ~reached_sink
            if not bool(active.any()):
                break
        # dual update
        u[:, cur] += min_val
        others = sr & (row_ids != cur)
        spc_of_row = spc.gather(1, col4row.clamp(min=0))
        u = torch.where(others, u + (min_val[:, None] - spc_of_row), u)
        v = torch.where(sc, v - (min_val[:, None] - spc), v)
        # augment along the path back to the current row
        j = sink
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        for _ in range(cur + 1):
            i = path[batch, j]
            row4col[batch, j] = torch.where(done, row4col[batch, j], i)
            previous = col4row[batch, i]
            col4row[batch, i] = torch.where(done, previous, j)
            j = torch.where(done, j, previous)
            done = done | (i == cur)
            if bool(done.all()):
                break
    return col4row


@numba.njit(cache=True, nogil=True)
def _solve_one(cost: np.ndarray, col4row: np.ndarray) -> None:  # pragma: no cover - compiled
    """One [nr, nc] problem (nr <= nc) in place into col4row; the same steps as :func:`_solve_wide`."""
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
            for it in range(nrem):
                j = rem[it]
                r = min_val + c[i, j] - u[i] - v[j]
                if r < spc[j]:
                    path[j] = i
                    spc[j] = r
                if spc[j] < lowest or (spc[j] == lowest and row4col[j] == -1):
                    lowest = spc[j]
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


def linear_sum_assignment(cost: torch.Tensor, maximize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact assignment for each matrix of a batch, as ``scipy.optimize.linear_sum_assignment`` returns it.

    Args:
        cost: [B, R, C] (or [R, C]); any float dtype, solved in float64 like scipy.
        maximize: maximise the total instead of minimising it.
    Returns:
        (rows, cols), each [B, min(R, C)] long, rows ascending: row ``rows[b, k]`` is paired with ``cols[b, k]``.
    """
    if cost.ndim == 2:
        rows, cols = linear_sum_assignment(cost[None], maximize)
        return rows[0], cols[0]
    if cost.ndim != 3:
        raise ValueError(f"linear_sum_assignment: expected [B, R, C], got shape {tuple(cost.shape)}")
    if not torch.isfinite(cost).all():
        raise ValueError("linear_sum_assignment: the cost matrix contains NaN or infinite entries")
    b, nr, nc = cost.shape
    dev = cost.device
    if b == 0 or nr == 0 or nc == 0:
        empty = torch.zeros(b, 0, dtype=torch.long, device=dev)
        return empty, empty.clone()
    work = cost.detach().to(torch.float64)
    transposed = nc < nr
    if transposed:
        work = work.transpose(1, 2)
    if maximize:
        work = -work
    if work.device.type == "cpu":
        # as many threads as torch may use here (a Ray worker with 1 CPU gets 1): idle pool threads would spin
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        col4row = torch.from_numpy(_solve_batch_cpu(np.ascontiguousarray(work.numpy())))
    else:
        col4row = _solve_wide(work.contiguous())  # [B, min(R, C)]
    ids = torch.arange(col4row.shape[1], device=dev).expand_as(col4row)
    if not transposed:
        return ids.clone(), col4row
    order = col4row.argsort(dim=1)
    return col4row.gather(1, order), ids.gather(1, order)
