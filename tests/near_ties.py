"""Labels computed by another path (a batch of several images, another process) may differ from the in-process
ones only where the in-process probabilities of a pixel's two best labels are within float noise, and at few
pixels: scoring images together sums the same floats in another order, which can flip a near-tie and nothing else."""
from __future__ import annotations

import numpy as np

GAP = 1e-3  # top-two probability gap below which a flip is float noise (a wrong label is far above it)
MOST = 8  # pixels per image that may flip


def assert_labels_match_up_to_near_ties(got, result) -> None:
    """``got`` [H, W] equals ``result.labels`` (a :class:`pgseg.segment.Segmentation`) except at most ``MOST``
    pixels whose top-two probabilities in ``result.probs`` are less than ``GAP`` apart."""
    expected = result.labels.numpy()
    got = np.asarray(got)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    differ = got != expected
    if not differ.any():
        return
    top2 = result.probs.topk(2, dim=0).values
    gaps = (top2[0] - top2[1]).numpy()[differ]
    assert differ.sum() <= MOST and (gaps < GAP).all(), (
        f"{int(differ.sum())} of {differ.size} pixels labelled differently, top-two gaps {gaps[:MOST].tolist()}")
