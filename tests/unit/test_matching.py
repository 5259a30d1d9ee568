import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from pgseg.model.matching import assignment_pairs, linear_sum_assignment

# ties="any" runs on the GPU where the costs are one (torch-linear-assignment's kernel): the same checks there
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here"))]


def _scipy(cost: torch.Tensor, maximize: bool):
    out = [scipy_lsa(c.double().numpy(), maximize=maximize) for c in cost]
    return np.stack([r for r, _ in out]), np.stack([c for _, c in out])


def _brute_force_best(cost: np.ndarray, maximize: bool) -> float:
    nr, nc = cost.shape
    if nr > nc:
        return _brute_force_best(cost.T, maximize)
    totals = [cost[np.arange(nr), list(p)].sum() for p in itertools.permutations(range(nc), nr)]
    return max(totals) if maximize else min(totals)


GENERATORS = {
    "normal": lambda s: torch.randn(*s),
    "small_integers": lambda s: torch.randint(-2, 3, s).float(),  # many ties
    "signs": lambda s: torch.sign(torch.randn(*s)),  # the released T-NPR cost matrices
    "constant": lambda s: torch.ones(*s),
}


@pytest.mark.parametrize("shape", [(40, 8, 8), (30, 16, 16), (20, 5, 9), (20, 9, 5), (10, 1, 4), (4, 64, 64)])
@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_identical_to_scipy_including_ties(shape, kind, maximize, device):
    cost = GENERATORS[kind](shape)
    rows, cols = linear_sum_assignment(cost.to(device), maximize=maximize)
    assert rows.device.type == cols.device.type == device
    rows, cols = rows.cpu(), cols.cpu()
    ref_rows, ref_cols = _scipy(cost, maximize)
    np.testing.assert_array_equal(rows.numpy(), ref_rows)
    np.testing.assert_array_equal(cols.numpy(), ref_cols)
    # any optimal assignment: scipy's where the optimum is unique, an equally good one where it ties
    rows, cols = linear_sum_assignment(cost.to(device), maximize=maximize, ties="any")
    assert rows.device.type == cols.device.type == device
    rows, cols = rows.cpu(), cols.cpu()
    if kind == "normal":
        np.testing.assert_array_equal(rows.numpy(), ref_rows)
        np.testing.assert_array_equal(cols.numpy(), ref_cols)
    else:
        k = min(shape[1:])
        assert all(len(set(r)) == len(set(c)) == k for r, c in zip(rows.tolist(), cols.tolist()))
        assert (rows.diff(dim=1) > 0).all()  # rows ascending, as scipy gives them
        batch = torch.arange(shape[0])[:, None]
        totals = cost.double()[batch, rows, cols].sum(1)
        ref_totals = cost.double()[batch, torch.from_numpy(ref_rows), torch.from_numpy(ref_cols)].sum(1)
        np.testing.assert_allclose(totals.numpy(), ref_totals.numpy(), atol=1e-9)


@pytest.mark.parametrize("shape", [(3, 3), (4, 4), (5, 5), (3, 5), (5, 3)])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("ties", ["scipy", "any"])
@pytest.mark.parametrize("device", DEVICES)
def test_optimal_against_brute_force(shape, maximize, ties, device):
    for kind in ("normal", "small_integers", "signs"):
        cost = GENERATORS[kind]((12, *shape))
        rows, cols = (t.cpu() for t in linear_sum_assignment(cost.to(device), maximize=maximize, ties=ties))
        assert rows.shape == (12, min(shape))
        for b in range(cost.shape[0]):
            assert len(set(cols[b].tolist())) == min(shape) and len(set(rows[b].tolist())) == min(shape)
            total = cost[b, rows[b], cols[b]].double().sum().item()
            assert total == pytest.approx(_brute_force_best(cost[b].double().numpy(), maximize), abs=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    with pytest.raises(ValueError, match="ties must be 'scipy' or 'any'"):
        linear_sum_assignment(torch.zeros(1, 2, 2), ties="lapjv")
    for ties in ("scipy", "any"):
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError, match="NaN or infinite"):
                linear_sum_assignment(torch.tensor([[[0.0, bad], [1.0, 2.0]]], device=device), ties=ties)
    with pytest.raises(ValueError, match=r"expected \[B, R, C\]"):
        linear_sum_assignment(torch.zeros(2, 2, 2, 2))
    rows, cols = linear_sum_assignment(torch.zeros(3, 0, 4))
    assert rows.shape == (3, 0) and cols.shape == (3, 0)


@pytest.mark.parametrize("shape", [(6, 3, 5), (6, 5, 5), (6, 7, 4), (3, 4, 0), (3, 0, 4)])
def test_gpu_solver_answer_as_row_column_pairs(shape):
    """The GPU solver answers one column per row (-1: unassigned when rows outnumber columns); the pairs built from
    it, without a host sync, are scipy's. Its CPU function (SciPy per image) answers in the same form."""
    from torch_linear_assignment import batch_linear_assignment

    cost = torch.randn(*shape, dtype=torch.float64)
    rows, cols = assignment_pairs(batch_linear_assignment(cost), shape[2])
    ref_rows, ref_cols = _scipy(cost, False) if min(shape[1:]) else (np.zeros((shape[0], 0)),) * 2
    np.testing.assert_array_equal(rows.numpy(), ref_rows)
    np.testing.assert_array_equal(cols.numpy(), ref_cols)
