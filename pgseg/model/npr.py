"""NPR — non-learnable prototypical regularisation (SPEC §3), in the order the method runs.

1. ``em_prototypes``: per image, T iterations of E (softmax of V·Pᵀ over prototypes) and M (column-normalised
   responsibilities, P = Z̃ᵀV, L2-normalised), from a stored ``mu``; no gradient.
2. ``PrototypeUnit``: those prototypes plus the reconstruction Z̃·P_T → ``mapping_x``, added to the stage tokens.
   ``TextPrototypes``: the same EM over the channels of the text feature, one-dimensional (T-NPR).
3. matching: one-to-one Hungarian pairing of group centres with prototypes (max or, as released, min similarity).
4. ``hrs_masks``: the hard rejecting strategy (the paper's matched-pair rule or the released column-0 rule).
5. ``pg_loss``: within-image contrastive loss over the kept pairs, both directions (per-image mean or pooled).
6. ``ema_``: mu ← γ·mu + (1−γ)·mean of P_T.
Everything works on whole batches; there is no loop over images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ProjectMLP
from .matching import Ties, linear_sum_assignment

EM_EPS = 1e-6
HRS_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------- 1. EM
@torch.no_grad()
def em_prototypes(v: torch.Tensor, mu: torch.Tensor, iters: int, norm_dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """EM from ``mu``: returns (P_T [B, G, C], Z̃ [B, N, G] the column-normalised responsibilities of the last step).

    ``v`` [B, N, C] tokens (not normalised); ``mu`` [1 or B, G, C]. ``norm_dim`` is where P is L2-normalised:
    2 (each prototype, image NPR) or 1 (across the prototypes, text NPR whose C is 1).
    """
    with torch.autocast(device_type=v.device.type, enabled=False), torch.profiler.record_function("npr.em"):
        v = v.float()
        p = mu.float().expand(v.shape[0], -1, -1)
        z = v.new_zeros(v.shape[0], v.shape[1], p.shape[1])
        for _ in range(iters):
            z = torch.softmax(v @ p.transpose(1, 2), dim=-1)  # E: [B, N, G], over prototypes
            z = z / (EM_EPS + z.sum(dim=1, keepdim=True))  # each prototype's weights sum to 1
            p = z.transpose(1, 2) @ v  # M: [B, G, C]
            p = p / (EM_EPS + p.norm(dim=norm_dim, keepdim=True))
    return p, z


@torch.no_grad()
def ema_(mu: torch.Tensor, prototypes: torch.Tensor, gamma: float,
         mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """In place: mu ← γ·mu + (1−γ)·mean over the (global, via ``mean``) batch of ``prototypes``; no renormalising."""
    batch_mean = prototypes.detach().float().mean(dim=0, keepdim=True)  # [1, G, C]
    if mean is not None:
        batch_mean = mean(batch_mean)
    mu.mul_(gamma).add_(batch_mean.to(mu.dtype), alpha=1.0 - gamma)


# ----------------------------------------------------------------------------------------------------- 2. modules
class PrototypeUnit(nn.Module):
    """The prototype half of a PG unit: EM prototypes of the stage input and their reconstruction.

    ``mu`` [1, G, C] starts N(0, √(2/C)) L2-normalised per prototype; ``mapping_x`` maps Z̃·P_T back to tokens.
    """

    def __init__(self, dim: int, num_prototypes: int, em_iters: int = 10, hidden_dim: int = 4096, num_layers: int = 2):
        super().__init__()
        self.em_iters = em_iters
        mu = torch.randn(1, num_prototypes, dim) * (2.0 / dim) ** 0.5
        self.register_buffer("mu", mu / (EM_EPS + mu.norm(dim=2, keepdim=True)))
        self.mapping_x = ProjectMLP(dim, dim, hidden_dim, num_layers)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``v`` [B, N, C] stage input → (prototypes P_T [B, G, C], reconstruction [B, N, C])."""
        prototypes, z = em_prototypes(v, self.mu, self.em_iters, norm_dim=2)
        recon = (z @ prototypes).to(v.dtype)  # [B, N, C] Z̃·P_T
        return prototypes, self.mapping_x(recon)


class TextPrototypes(nn.Module):
    """T-NPR: ``num_prototypes`` scalars per caption from EM over the C channels of the (detached) text feature,
    each channel a one-dimensional token. ``mu`` [1, G, 1] is normalised across the G prototypes."""

    def __init__(self, num_prototypes: int = 8, em_iters: int = 10):
        super().__init__()
        self.em_iters = em_iters
        mu = torch.randn(1, num_prototypes, 1) * (2.0 / num_prototypes) ** 0.5
        self.register_buffer("mu", mu / (EM_EPS + mu.norm(dim=1, keepdim=True)))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """``feature`` [B, C] → prototypes [B, G, 1]."""
        prototypes, _ = em_prototypes(feature.detach()[:, :, None], self.mu, self.em_iters, norm_dim=1)
        return prototypes


# -------------------------------------------------------------------------------------------- safe normalisation
class _SafeNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, grad_eps: float) -> torch.Tensor:  # type: ignore[override]
        norm = x.norm(dim=dim, keepdim=True)
        ctx.save_for_backward(x, norm)
        ctx.dim, ctx.grad_eps = dim, grad_eps
        return x / norm.clamp_min(1e-12)  # exactly F.normalize

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, norm = ctx.saved_tensors
        unit = torch.where(norm > 0, x / norm, torch.zeros_like(x))  # the true direction, even below 1e-12
        # d(x/|x|) = (g − u⟨u, g⟩)/|x|, with |x| softened to sqrt(|x|² + eps²) so a tiny vector cannot explode
        grad = (g - unit * (unit * g).sum(dim=ctx.dim, keepdim=True)) / (norm.square() + ctx.grad_eps ** 2).sqrt()
        return torch.where(norm > 0, grad, torch.zeros_like(grad)), None, None


def normalize(x: torch.Tensor, dim: int = -1, grad_eps: float = 1e-3) -> torch.Tensor:
    """F.normalize in the forward pass, with a backward that cannot explode.

    The backward is the exact derivative of x/|x| with |x| softened to sqrt(|x|² + grad_eps²) (bounded by
    |g|/grad_eps). For one-dimensional vectors (T-NPR) x/|x| is a sign and the gradient is exactly 0 — where the
    released code's F.normalize gives up to 1e12·g when the channel mean is rounding noise (SPEC §3.4).
    """
    return _SafeNormalize.apply(x, dim, grad_eps)


# ---------------------------------------------------------------------------------------------------- 3. matching
# Hungarian pairing on the cosine similarity [B, G, M] (pgseg.model.matching, exact, batched): maximise it (paper)
# or, as released, minimise it (each centre then gets a maximally dissimilar prototype). Done inside pg_loss.


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], index [B, K] → [B, K, C]."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------------------- 4. HRS
@torch.no_grad()
def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation along dim 1 ([B, K])."""
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo + HRS_EPS)


@torch.no_grad()
def hrs_masks(g_pair: torch.Tensor, p_pair: torch.Tensor, phi: float, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Which matched pairs the PG loss keeps → (keep_g2p [B, K], keep_p2g [B, K]).

    ``g_pair``/``p_pair`` [B, K, C]: normalised centres and prototypes of the K matched pairs, in pair order.
    - ``matched_pair`` (paper): keep pair k if cos(g_k, p_k) > φ, for both directions.
    - ``column0`` (released): the similarity matrix is min-max normalised over its rows and then, through an
      indexing slip, column 0 is read instead of the diagonal: the group→prototype rows keep k if
      norm_k(⟨p_k, g_0⟩) > φ and the prototype→group rows keep k if norm_k(⟨g_k, p_0⟩) > φ.
    """
    if rule == "matched_pair":
        keep = (g_pair * p_pair).sum(-1) > phi
        return keep, keep
    if rule == "column0":
        keep_g2p = _minmax((p_pair * g_pair[:, :1]).sum(-1)) > phi
        keep_p2g = _minmax((g_pair * p_pair[:, :1]).sum(-1)) > phi
        return keep_g2p, keep_p2g
    raise ValueError(f"hrs rule must be 'matched_pair' or 'column0', got {rule!r}")


# ------------------------------------------------------------------------------------------------------ 5. PG loss
@dataclass
class PGLoss:
    loss: torch.Tensor  # scalar
    kept_fraction: torch.Tensor  # scalar, fraction of (pair, direction) terms HRS kept
    rows: torch.Tensor  # [B, K] matched centres
    cols: torch.Tensor  # [B, K] matched prototypes
    keep_g2p: torch.Tensor  # [B, K]
    keep_p2g: torch.Tensor  # [B, K]
    logits_g2p: torch.Tensor  # [B, K, M] scaled
    logits_p2g: torch.Tensor  # [B, K, G] scaled


def _cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy: logits [B, K, X], target [B, K] → [B, K]."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, target[:, :, None])[:, :, 0]


def pg_loss(centres: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor, *, maximize: bool,
            hrs: bool, phi: float, hrs_rule: str, reduction: str, grad_eps: float = 1e-3,
            ties: Ties = "scipy") -> PGLoss:
    """L_PG between group centres [B, G, C] and prototypes [B, M, C] (no gradient to the prototypes).

    Matched pairs (g_k, p_k) are positives; every other prototype (group) of the same image is a negative:
    logits s·ĝ_k·p̂ⱼ over the M prototypes and s·p̂_k·ĝⱼ over the G groups, cross-entropy to the partner.
    ``reduction``: ``per_image_mean`` (paper Eq. 3: per image, each direction averaged over the q kept pairs and
    the two summed, then the mean over images) or ``pooled`` (released: each direction averaged over its kept rows
    across the whole batch, the two summed).
    """
    g = normalize(centres.float(), dim=-1, grad_eps=grad_eps)  # [B, G, C]
    p = F.normalize(prototypes.detach().float(), dim=-1)  # [B, M, C]
    # 3. matching: [B, K] row and column indices, on float32 similarities (autocast would round them to bf16/fp16,
    # whose steps near 0.7 are 0.004/0.0005: close pairs would tie and the assignment change)
    with torch.profiler.record_function("npr.matching"), torch.autocast(g.device.type, enabled=False):
        # a non-finite feature makes the loss non-finite (the trainer skips or stops); matching must not fail first
        similarity = torch.nan_to_num(g.detach() @ p.transpose(1, 2), nan=0.0, posinf=1.0, neginf=-1.0)
        rows, cols = linear_sum_assignment(similarity, maximize=maximize, ties=ties)
    g_pair, p_pair = _gather_rows(g, rows), _gather_rows(p, cols)  # [B, K, C]
    logits_g2p = scale * (g_pair @ p.transpose(1, 2))  # [B, K, M]
    logits_p2g = scale * (p_pair @ g.transpose(1, 2))  # [B, K, G]
    ce_g2p = _cross_entropy_rows(logits_g2p, cols)
    ce_p2g = _cross_entropy_rows(logits_p2g, rows)
    if hrs:
        keep_g2p, keep_p2g = hrs_masks(g_pair.detach(), p_pair, phi, hrs_rule)
    else:
        keep_g2p = keep_p2g = torch.ones_like(rows, dtype=torch.bool)
    zero = ce_g2p.new_zeros(())
    if reduction == "pooled":
        loss = zero
        for ce, keep in ((ce_g2p, keep_g2p), (ce_p2g, keep_p2g)):
            n = keep.sum()
            loss = loss + torch.where(n > 0, (ce * keep).sum() / n.clamp_min(1), zero)
    elif reduction == "per_image_mean":
        # per image and direction, the mean over kept pairs (the paper's 1/q), summed; then the mean over images
        per_image = sum((ce * keep).sum(1) / keep.sum(1).clamp_min(1) for ce, keep in ((ce_g2p, keep_g2p), (ce_p2g, keep_p2g)))
        used = keep_g2p.any(1) | keep_p2g.any(1)  # [B]
        loss = torch.where(used.any(), (per_image * used).sum() / used.sum().clamp_min(1), zero)
    else:
        raise ValueError(f"pg reduction must be 'per_image_mean' or 'pooled', got {reduction!r}")
    kept = (keep_g2p.float().mean() + keep_p2g.float().mean()) / 2
    return PGLoss(loss, kept, rows, cols, keep_g2p, keep_p2g, logits_g2p, logits_p2g)
