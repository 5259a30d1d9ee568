"""Labels computed by another path (a batch of several images, another thread count) may differ from the in-process
ones only at float near-ties, and at few pixels: the same floats summed in another order can tip a nearly tied
decision and nothing else. The protocol's decisions (SPEC §6) are a pixel's group (its argmax over the groups) and
its label (the argmax of the averaged probabilities): a tipped group moves a region's border, so the pixel takes a
label it touches; a tipped label is one whose two best probabilities were nearly equal."""
from __future__ import annotations

import numpy as np

GAP = 1e-3  # top-two probability gap below which a flip is float noise (a wrong label is far above it)
MOST = 8  # pixels per image that may flip


def assert_labels_match_up_to_near_ties(got, result) -> None:
    """``got`` [H, W] equals ``result.labels`` (a :class:`pgseg.segment.Segmentation`) except at most ``MOST``
    pixels, each either on a border of the in-process labels and labelled as one of its 3x3 neighbours there, or one
    whose top-two probabilities in ``result.probs`` are less than ``GAP`` apart."""
    expected = result.labels.numpy()
    got = np.asarray(got)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    rows, cols = np.nonzero(got != expected)
    if not len(rows):
        return
    top2 = result.probs.topk(2, dim=0).values
    gaps = (top2[0] - top2[1]).numpy()[rows, cols]
    padded = np.pad(expected, 1, mode="edge")
    beside = [bool((padded[r:r + 3, c:c + 3] == got[r, c]).any()) for r, c in zip(rows, cols)]
    tipped = (gaps < GAP) | np.array(beside)
    where = list(zip(rows.tolist(), cols.tolist(), got[rows, cols].tolist(), expected[rows, cols].tolist(),
                     gaps.tolist(), beside))
    assert len(rows) <= MOST and tipped.all(), (
        f"{len(rows)} of {got.size} pixels labelled differently; (row, col, got, expected, top-two gap, a "
        f"neighbour's label): {where[:MOST]}")
