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


def multi_label_loss(image: torch.Tensor, nouns: torch.Tensor, scale: torch.Tensor,
                     world: Collectives = SINGLE) -> torch.Tensor:
    """GroupViT's multi-label contrastive loss: image [B, D] against its K noun prompts nouns [B, K, D].

    Image → all noun prompts of the global batch, target spread evenly over its own K; each noun prompt → all
    images, target its own image.
    """
    gather, rank = world.gather, world.rank
    b, k, _ = nouns.shape
    image = F.normalize(image, dim=-1)
    nouns = F.normalize(nouns, dim=-1).reshape(b * k, -1)  # [B·K, D]
    all_nouns, all_images = gather(nouns), gather(image)  # [W·B·K, D], [W·B, D]
    own = torch.arange(b, device=image.device) + rank * b  # global index of each local image
    target_img = torch.zeros(b, all_nouns.shape[0], device=image.device, dtype=image.dtype)
    cols = (own[:, None] * k + torch.arange(k, device=image.device)).reshape(b, k)
    target_img.scatter_(1, cols, 1.0 / k)
    loss_img = torch.sum(-target_img * F.log_softmax(scale * image @ all_nouns.t(), dim=-1), dim=-1).mean()
    loss_text = F.cross_entropy(scale * nouns @ all_images.t(), own.repeat_interleave(k))
    return 0.5 * (loss_img + loss_text)
