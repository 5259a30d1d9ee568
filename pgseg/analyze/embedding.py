"""The paper's two pictures of the group embeddings (Figs. 5 and 6), as numbers and plots: compactness (how close the
groups of one class lie compared with groups of other classes) and richness (how the variance spreads over the
embedding's dimensions). Each group is one projected final group token of one window, named by the ground-truth
class that covers most of its pixels (:mod:`pgseg.analyze.oracle`); groups that cover no labelled pixel are left
out."""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..plots import pyplot


@dataclass
class Compactness:
    ratio: float  # mean intra-class cosine distance / mean inter-class cosine distance (lower: more compact)
    intra: float
    inter: float
    per_class: dict[str, float]  # each class's mean intra-class distance (classes with >= 2 groups)


def compactness(embeddings: torch.Tensor, classes: torch.Tensor, names: list[str]) -> Compactness:
    """``embeddings`` [N, D] (any scale: compared by cosine), ``classes`` [N] class ids → the distances over all
    pairs of distinct groups."""
    if embeddings.shape[0] != classes.shape[0] or embeddings.shape[0] < 2:
        raise ValueError(f"need >= 2 groups with one class each, got {embeddings.shape[0]} and {classes.shape[0]}")
    x = F.normalize(embeddings.double(), dim=-1)
    dist = 1 - x @ x.t()
    same = classes[:, None] == classes[None, :]
    off = ~torch.eye(len(classes), dtype=torch.bool)
    intra_pairs, inter_pairs = same & off, ~same
    if not intra_pairs.any() or not inter_pairs.any():
        raise ValueError("compactness needs two groups of one class and groups of two classes")
    intra, inter = float(dist[intra_pairs].mean()), float(dist[inter_pairs].mean())
    per_class = {}
    for c in classes.unique().tolist():
        mine = (classes == c)
        pairs = mine[:, None] & mine[None, :] & off
        if pairs.any():
            per_class[names[c]] = float(dist[pairs].mean())
    return Compactness(intra / inter, intra, inter, per_class)


@dataclass
class Richness:
    variances: list[float]  # per dimension of the unit-normalised embeddings, largest first
    effective_dims: float  # participation ratio of the covariance's eigenvalues: (Σλ)² / Σλ²
    total_variance: float


def richness(embeddings: torch.Tensor) -> Richness:
    """Per-dimension variance of the unit-normalised group embeddings [N, D] and how many dimensions carry it."""
    if embeddings.shape[0] < 2:
        raise ValueError("richness needs at least two groups")
    x = F.normalize(embeddings.double(), dim=-1)
    variances = x.var(dim=0, unbiased=True)
    eig = torch.linalg.eigvalsh(torch.cov(x.t())).clamp(min=0)
    effective = float(eig.sum() ** 2 / (eig ** 2).sum()) if eig.sum() > 0 else 0.0
    return Richness(sorted(variances.tolist(), reverse=True), effective, float(variances.sum()))


def projection_2d(embeddings: torch.Tensor) -> torch.Tensor:
    """[N, 2]: the unit-normalised embeddings on their first two principal components (PCA, deterministic; the
    paper's Fig. 5 uses t-SNE, which is not among this project's dependencies)."""
    x = F.normalize(embeddings.double(), dim=-1)
    x = x - x.mean(dim=0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].t()).float()


def _png(fig) -> bytes:
    plt = pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def compactness_plot(embeddings: torch.Tensor, classes: torch.Tensor, names: list[str], result: Compactness) -> bytes:
    plt = pyplot()
    points = projection_2d(embeddings)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    for c in classes.unique().tolist():
        mine = classes == c
        ax.scatter(points[mine, 0], points[mine, 1], s=8, alpha=0.6, label=names[c])
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title(f"group embeddings (PCA), intra/inter distance {result.ratio:.3f}")
    return _png(fig)


def richness_plot(result: Richness) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    ax.plot(range(1, len(result.variances) + 1), result.variances)
    ax.set_xlabel("dimension (by variance)")
    ax.set_ylabel("variance")
    ax.set_title(f"group embedding variance per dimension, effective dims {result.effective_dims:.1f}")
    ax.grid(alpha=0.3)
    return _png(fig)


__all__ = ["Compactness", "Richness", "compactness", "compactness_plot", "projection_2d", "richness",
           "richness_plot"]
