"""The step benchmark's stand-in for the released code computes what our model computes, the slow way."""
from __future__ import annotations

import pytest
import torch

from benchmarks.step import _per_image_scipy, _written_out_attention, release_way
from pgseg.config import load_config
from pgseg.model import PGSeg
from pgseg.model.matching import linear_sum_assignment


def test_the_slow_parts_compute_what_the_fast_ones_do():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=g) for _ in range(3))
    fast = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(_written_out_attention(q, k, v), fast, atol=1e-5)
    cost = torch.sign(torch.randn(6, 8, 5, generator=g))  # ties: SciPy's choice either way
    for a, b in zip(_per_image_scipy(cost, maximize=False), linear_sum_assignment(cost, ties="scipy")):
        assert torch.equal(a, b)


def test_models_built_the_release_way_use_the_slow_parts_and_nothing_stays_patched():
    import pgseg.model.layers as layers
    import pgseg.model.npr as npr
    import pgseg.model.text_encoder as text_encoder
    import pgseg.train.step as step

    def attention_modes(model):
        return {m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}

    config = load_config("tiny")
    ours = text_encoder.used_columns
    padded = torch.zeros(2, 16, dtype=torch.long)
    padded[:, :2] = torch.tensor([49406, 49407])
    assert ours(padded) == 8
    assert attention_modes(PGSeg.from_config(config)) == {True}
    with release_way():
        assert attention_modes(PGSeg.from_config(config)) == {False}  # timm's blocks write attention out
        assert layers.F.scaled_dot_product_attention is _written_out_attention  # and ours
        assert npr.linear_sum_assignment is _per_image_scipy
        assert text_encoder.used_columns(padded) == 16  # the text tower over every column
        optimizer = step.build_optimizer(PGSeg.from_config(config), config, 64)
        assert optimizer.defaults["foreach"] is False and optimizer.defaults["fused"] is False
    assert layers.F is torch.nn.functional and npr.linear_sum_assignment is linear_sum_assignment
    assert text_encoder.used_columns is ours
    assert attention_modes(PGSeg.from_config(config)) == {True}
    assert step.build_optimizer(PGSeg.from_config(config), config, 64).defaults["fused"] is True


@pytest.fixture(autouse=True)
def _no_leak():
    yield
    import timm.layers

    assert timm.layers.use_fused_attn()
