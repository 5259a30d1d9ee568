"""NPR against direct, loop-by-loop implementations of SPEC §3 (the library itself never loops over images)."""
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment as scipy_lsa

from pgseg.model.npr import PrototypeUnit, TextPrototypes, em_prototypes, hrs_masks, normalize, pg_loss


def _em_direct(v, mu, iters, norm_dim):
    """SPEC §3.1 for one image at a time, written out."""
    outs, zs = [], []
    for x in v:  # [N, C]
        p = mu[0].clone()
        for _ in range(iters):
            z = torch.softmax(x @ p.t(), dim=1)
            z = z / (1e-6 + z.sum(dim=0, keepdim=True))
            p = z.t() @ x
            p = p / (1e-6 + p.norm(dim=norm_dim - 1, keepdim=True))
        outs.append(p)
        zs.append(z)
    return torch.stack(outs), torch.stack(zs)


def test_em_matches_direct_implementation():
    v = torch.randn(3, 50, 16)
    mu = F.normalize(torch.randn(1, 6, 16), dim=2)
    p, z = em_prototypes(v, mu, 10, norm_dim=2)
    p_ref, z_ref = _em_direct(v, mu, 10, norm_dim=2)
    torch.testing.assert_close(p, p_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, z_ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(p.norm(dim=2), torch.ones(3, 6), atol=1e-5)  # unit prototypes
    assert torch.allclose(z.sum(dim=1), torch.ones(3, 6), atol=1e-4)  # each prototype's weights sum to 1


def test_text_em_normalises_across_prototypes():
    tp = TextPrototypes(8, em_iters=10)
    feat = torch.randn(4, 32)
    p = tp(feat)
    assert p.shape == (4, 8, 1)
    assert torch.allclose(p.norm(dim=1), torch.ones(4, 1), atol=1e-5)
    p_ref, _ = _em_direct(feat[:, :, None], tp.mu, 10, norm_dim=1)
    torch.testing.assert_close(p, p_ref, atol=1e-5, rtol=1e-5)


def test_prototype_unit_reconstruction_and_no_gradient_to_prototypes():
    unit = PrototypeUnit(16, 5, em_iters=3, hidden_dim=32)
    v = torch.randn(2, 20, 16, requires_grad=True)
    protos, recon = unit(v)
    assert not protos.requires_grad  # EM runs without gradient
    p_ref, z_ref = _em_direct(v.detach(), unit.mu, 3, norm_dim=2)
    unit.eval()
    torch.testing.assert_close(unit(v)[1], unit.mapping_x(z_ref @ p_ref), atol=1e-5, rtol=1e-5)
    recon.sum().backward()
    assert v.grad is None  # the reconstruction's only gradient path is mapping_x, not the EM source
    assert unit.mapping_x.linear_out.weight.grad is not None and unit.mu.grad is None


def _hrs_direct(g, p_matched, phi, rule):
    """Masks as SPEC §3.3.3 words them, on the square matched matrices, one image at a time."""
    keep_g2p, keep_p2g = [], []
    for gb, pb in zip(g, p_matched):
        s = F.normalize(gb, dim=-1) @ F.normalize(pb, dim=-1).t()  # S[k, j] = cos(g_k, p_j)
        if rule == "matched_pair":
            keep = s.diagonal() > phi
            keep_g2p.append(keep), keep_p2g.append(keep)
        else:
            def col0(m):
                n = (m - m.min(dim=0, keepdim=True).values) / (m.max(dim=0, keepdim=True).values - m.min(dim=0, keepdim=True).values + 1e-6)
                return n[:, 0] > phi
            keep_p2g.append(col0(s))  # used on the rows of Sᵀ (prototype k against the groups)
            keep_g2p.append(col0(s.t()))  # used on the rows of S'ᵀ = S (group k against the prototypes)
    return torch.stack(keep_g2p), torch.stack(keep_p2g)


@pytest.mark.parametrize("rule", ["matched_pair", "column0"])
def test_hrs_masks_both_rules(rule):
    g, p = F.normalize(torch.randn(6, 8, 12), dim=-1), F.normalize(torch.randn(6, 8, 12), dim=-1)
    keep_g2p, keep_p2g = hrs_masks(g, p, 0.1, rule)
    ref_g2p, ref_p2g = _hrs_direct(g, p, 0.1, rule)
    assert torch.equal(keep_g2p, ref_g2p) and torch.equal(keep_p2g, ref_p2g)
    if rule == "column0":
        assert keep_g2p.any(dim=1).all() and keep_p2g.any(dim=1).all()  # the max row always passes


def _pg_direct(centres, protos, scale, maximize, phi, hrs_rule, reduction, hrs=True):
    """SPEC §3.3 for one image at a time: scipy matching, HRS, the two cross-entropies, both reductions."""
    per_image, pooled = [], {"g2p": [], "p2g": []}
    for g, p in zip(centres, protos):
        gn, pn = F.normalize(g, dim=-1), F.normalize(p, dim=-1)
        rows, cols = scipy_lsa((gn @ pn.t()).double().numpy(), maximize=maximize)
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        if hrs:
            keep_g2p, keep_p2g = _hrs_direct(g[rows][None], p[cols][None], phi, hrs_rule)
            keep_g2p, keep_p2g = keep_g2p[0], keep_p2g[0]
        else:
            keep_g2p = keep_p2g = torch.ones(len(rows), dtype=torch.bool)
        terms = []
        for k in range(len(rows)):
            ce_g2p = F.cross_entropy(scale * gn[rows[k]] @ pn.t(), cols[k])
            ce_p2g = F.cross_entropy(scale * pn[cols[k]] @ gn.t(), rows[k])
            if keep_g2p[k]:
                pooled["g2p"].append(ce_g2p)
            if keep_p2g[k]:
                pooled["p2g"].append(ce_p2g)
            if keep_g2p[k]:
                terms.append(ce_g2p + ce_p2g)
        if terms:
            per_image.append(torch.stack(terms).mean())
    if reduction == "pooled":
        return sum(torch.stack(v).mean() for v in pooled.values() if v)
    return torch.stack(per_image).mean()


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("shape", [((4, 8, 16), (4, 8, 16)), ((3, 6, 16), (3, 10, 16)), ((3, 10, 16), (3, 6, 16))])
def test_pg_loss_matches_spec_formulas(mode, shape):
    centres, protos = torch.randn(*shape[0]), torch.randn(*shape[1])
    scale = torch.tensor(10.0)
    kw = dict(maximize=mode == "paper", phi=0.1, hrs_rule="matched_pair" if mode == "paper" else "column0",
              reduction="per_image_mean" if mode == "paper" else "pooled")
    got = pg_loss(centres, protos, scale, hrs=True, **kw).loss
    assert got.item() == pytest.approx(_pg_direct(centres, protos, scale, **kw).item(), rel=1e-5)
    no_hrs = pg_loss(centres, protos, scale, hrs=False, **kw)
    assert no_hrs.kept_fraction.item() == 1.0
    assert no_hrs.loss.item() == pytest.approx(_pg_direct(centres, protos, scale, hrs=False, **kw).item(), rel=1e-5)


def test_pg_loss_gradient_reaches_centres_and_scale_not_prototypes():
    centres = torch.randn(2, 8, 16, requires_grad=True)
    protos = torch.randn(2, 8, 16, requires_grad=True)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    out = pg_loss(centres, protos, log_scale.exp(), maximize=True, hrs=True, phi=0.0, hrs_rule="matched_pair",
                  reduction="per_image_mean")
    out.loss.backward()
    assert centres.grad.abs().sum() > 0 and log_scale.grad is not None and protos.grad is None


def test_paper_matching_maximises_and_official_minimises_similarity():
    centres = torch.randn(8, 8, 16)
    protos = centres[:, torch.randperm(8)] + 0.01 * torch.randn(8, 8, 16)  # each centre has a near-copy
    paper = pg_loss(centres, protos, torch.tensor(10.0), maximize=True, hrs=False, phi=0.1, hrs_rule="matched_pair",
                    reduction="per_image_mean")
    official = pg_loss(centres, protos, torch.tensor(10.0), maximize=False, hrs=False, phi=0.1, hrs_rule="column0",
                       reduction="pooled")
    sim = F.normalize(centres, dim=-1) @ F.normalize(protos, dim=-1).transpose(1, 2)
    paper_sim = sim.gather(2, paper.cols[:, :, None]).mean()
    official_sim = sim.gather(2, official.cols[:, :, None]).mean()
    assert paper_sim > 0.99 and official_sim < 0.0


def test_safe_normalize_matches_f_normalize_and_bounds_tnpr_gradient():
    x = torch.randn(4, 8, 32, requires_grad=True)
    w = torch.randn(4, 8, 32)
    (normalize(x) * w).sum().backward()
    g_ours = x.grad.clone()
    x.grad = None
    (F.normalize(x, dim=-1) * w).sum().backward()
    torch.testing.assert_close(normalize(x.detach()), F.normalize(x.detach(), dim=-1))
    torch.testing.assert_close(g_ours, x.grad, rtol=1e-4, atol=1e-7)
    # T-NPR: 1-D values that are rounding noise (the channel mean of fresh LayerNorm outputs)
    noise = (torch.randn(4, 8, 1) * 1e-13).requires_grad_(True)
    protos = F.normalize(torch.randn(4, 8, 1), dim=1)
    loss_released = F.cross_entropy((10 * F.normalize(noise, dim=-1) @ F.normalize(protos, dim=-1).transpose(1, 2)).flatten(0, 1),
                                    torch.arange(8).repeat(4))
    (g_released,) = torch.autograd.grad(loss_released, noise)
    ours = pg_loss(noise, protos, torch.tensor(10.0), maximize=False, hrs=True, phi=0.1, hrs_rule="column0",
                   reduction="pooled")
    (g_ours,) = torch.autograd.grad(ours.loss, noise)
    assert torch.isfinite(g_ours).all() and g_ours.norm() < 1e-3 and g_released.norm() > 1e6
    # and away from zero a 1-D normalisation has exactly zero gradient (x/|x| is a sign)
    big = torch.randn(4, 8, 1).requires_grad_(True)
    (g_big,) = torch.autograd.grad(pg_loss(big, protos, torch.tensor(10.0), maximize=False, hrs=True, phi=0.1,
                                           hrs_rule="column0", reduction="pooled").loss, big)
    assert g_big.abs().max() == 0


@pytest.mark.parametrize("reduction, rule", [("pooled", "column0"), ("per_image_mean", "matched_pair")])
def test_pg_loss_is_zero_with_no_gradient_when_hrs_keeps_no_pair(reduction, rule):
    """The release's pooled loss is the mean over no rows (NaN) when HRS keeps nothing; ours is 0 (a deliberate
    difference, README): the step goes on with no PG gradient."""
    torch.manual_seed(3)
    centres = torch.randn(2, 8, 16, requires_grad=True)
    protos = torch.randn(2, 8, 16)
    out = pg_loss(centres, protos, torch.tensor(10.0), maximize=False, hrs=True, phi=1.0, hrs_rule=rule,
                  reduction=reduction)
    assert not out.keep_g2p.any() and not out.keep_p2g.any()  # nothing passes φ = 1
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(centres.grad, torch.zeros_like(centres))
    kept = pg_loss(centres, protos, torch.tensor(10.0), maximize=False, hrs=True, phi=-2.0, hrs_rule=rule,
                   reduction=reduction)
    assert kept.keep_g2p.all() and kept.loss.item() > 0  # the same inputs with every pair kept


def test_the_matching_sees_float32_similarities_under_bf16_autocast():
    """Two groups whose best prototypes differ by ~1e-4 in cosine (far below bf16's 0.004 step near 0.7): under
    autocast the assignment is still the float32 one (group 0 → prototype 1, group 1 → prototype 0)."""
    eps = 1e-4
    angles = torch.tensor([math.pi / 4 + eps, math.pi / 4 - eps])
    centres = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]  # [1, 2, 2]
    protos = torch.eye(2)[None]  # [1, 2, 2]
    kw = dict(maximize=True, hrs=False, phi=0.0, hrs_rule="matched_pair", reduction="per_image_mean")
    plain = pg_loss(centres, protos, torch.tensor(10.0), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pg_loss(centres, protos, torch.tensor(10.0), **kw)
    assert plain.cols.tolist() == [[1, 0]]
    assert mixed.rows.tolist() == plain.rows.tolist() and mixed.cols.tolist() == plain.cols.tolist()
