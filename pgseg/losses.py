"""Image–text losses over the global batch (open_clip's local-loss pattern): every rank scores its own rows
against the features gathered from all ranks, with labels offset by rank·B; gradients flow through the gather."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import SINGLE, Collectives


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                     world: Collectives = SINGLE) -> torch.Tensor:
    """Symmetric InfoNCE: image [B, D], text [B, D] (unnormalised) → scalar, over the global batch."""
    gather, rank = world.gather, world.rank
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    loss_img = F.cross_entropy(scale * image @ gather(text).t(), labels)
    loss_text = F.cross_entropy(scale * text @ gather(image).t(), labels)
    return 0.5 * (loss_img + loss_text)


def _similarity(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosines of unit vectors: image [N, D] against text [M, D] → [N, M]; image [N, G, D] (an image's groups) →
    [N, M] each image's best-matching group for every text."""
    if image.ndim == 3:
        return (image @ text.t()).max(dim=1).values
    return image @ text.t()


def multi_label_loss(image: torch.Tensor, nouns: torch.Tensor, scale: torch.Tensor,
                     world: Collectives = SINGLE, valid: torch.Tensor | None = None) -> torch.Tensor:
    """GroupViT's multi-label contrastive loss: image [B, D] against its K noun prompts nouns [B, K, D].

    Image → all noun prompts of the global batch, target spread evenly over its own K; each noun prompt → all
    images, target its own image. With image [B, G, D] (the image's groups), an image scores a noun prompt by its
    best-matching group (multiple-instance: each noun of the caption must be carried by some group, and no group
    may carry a noun of another image's caption). ``valid`` [B, K] bool: the prompts that take part (the others,
    e.g. a caption standing in for a missing noun, are neither targets nor candidates).
    """
    gather, rank = world.gather, world.rank
    b, k, _ = nouns.shape
    image = F.normalize(image, dim=-1)
    nouns = F.normalize(nouns, dim=-1).reshape(b * k, -1)  # [B·K, D]
    all_nouns, all_images = gather(nouns), gather(image)  # [W·B·K, D], [W·B, (G,) D]
    own = torch.arange(b, device=image.device) + rank * b  # global index of each local image
    cols = (own[:, None] * k + torch.arange(k, device=image.device)).reshape(b, k)
    logits_img = scale * _similarity(image, all_nouns)  # [B, W·B·K]
    if valid is None:
        target_img = torch.zeros_like(logits_img).scatter_(1, cols, 1.0 / k)
        loss_img = torch.sum(-target_img * F.log_softmax(logits_img, dim=-1), dim=-1).mean()
        loss_text = F.cross_entropy(scale * _similarity(all_images, nouns).t(), own.repeat_interleave(k))
        return 0.5 * (loss_img + loss_text)
    valid = valid.reshape(b, k)
    all_valid = gather(valid.float()).reshape(-1) > 0.5  # [W·B·K]
    logits_img = logits_img.masked_fill(~all_valid[None], float("-inf"))
    counts = valid.sum(dim=1)  # [B]
    target_img = torch.zeros_like(logits_img).scatter_(1, cols, valid.float() / counts.clamp(min=1)[:, None])
    log_probs = F.log_softmax(logits_img, dim=-1).masked_fill(~all_valid[None], 0.0)
    rows = counts > 0
    zero = logits_img.new_zeros(())
    loss_img = torch.where(rows.any(), (-(target_img * log_probs).sum(-1) * rows).sum() / rows.sum().clamp(min=1),
                           zero)
    mine = valid.reshape(-1)
    per_noun = F.cross_entropy(scale * _similarity(all_images, nouns).t(), own.repeat_interleave(k),
                               reduction="none")
    loss_text = torch.where(mine.any(), (per_noun * mine).sum() / mine.sum().clamp(min=1), zero)
    return 0.5 * (loss_img + loss_text)
