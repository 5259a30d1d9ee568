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
                     world: Collectives = SINGLE, ids: torch.Tensor | None = None,
                     exclusive: bool = False) -> torch.Tensor:
    """GroupViT's multi-label contrastive loss: image [B, D] against its K noun prompts nouns [B, K, D].

    Image → all noun prompts of the global batch, target spread evenly over its own K; each noun prompt → all
    images, target its own image. With image [B, G, D] (the image's groups), an image scores a noun prompt by its
    best-matching group (multiple-instance: each noun of the caption must be carried by some group, and no group
    may carry a noun of another image's caption). ``exclusive``: an image scores a noun its caption has by the group
    that carries that noun alone (:func:`noun_groups`: no group carries two of the caption's nouns), other nouns
    still by its best-matching group.

    ``ids`` [B, K] (noun ids, ``pgseg.text.FILLER`` = -1 for a prompt that is not a noun): prompts of one noun are
    one concept, so an image's target is every prompt in the batch of a noun its caption has, and a prompt's
    target every image whose caption has its noun (GroupViT counts those as negatives); fillers take no part.
    """
    gather, rank = world.gather, world.rank
    b, k, _ = nouns.shape
    image = F.normalize(image, dim=-1)
    nouns = F.normalize(nouns, dim=-1).reshape(b * k, -1)  # [B·K, D]
    all_nouns, all_images = gather(nouns), gather(image)  # [W·B·K, D], [W·B, (G,) D]
    if ids is None:  # every prompt its own noun: GroupViT's loss
        ids = (torch.arange(b * k, device=image.device) + rank * b * k).reshape(b, k)
    ids = ids.reshape(b, k)
    all_ids = gather(ids)  # [W·B, K]
    flat = all_ids.reshape(-1)  # [W·B·K]
    nouns_in = flat >= 0  # fillers are no candidates
    # image i → prompt j: j's noun is one of i's nouns (which of i's prompts has it: [B, K, W·B·K])
    has = (flat[None, None, :] == ids[:, :, None]) & (ids[:, :, None] >= 0)
    pos_img = has.any(dim=1) & nouns_in[None]
    # own prompt p → image m: m's caption has p's noun (which of m's prompts has it: [B·K, W·B, K])
    mine = ids.reshape(-1)  # [B·K]
    had = (all_ids[None, :, :] == mine[:, None, None]) & (mine[:, None, None] >= 0)
    pos_text = had.any(dim=-1)  # [B·K, W·B]
    if exclusive and image.ndim == 3:
        carrier = noun_groups(all_images, all_nouns.reshape(all_images.shape[0], k, -1), all_ids)  # [W·B, K]
        own = carrier[rank * b:(rank + 1) * b]
        per_group = torch.einsum("bgd,md->bgm", image, all_nouns)  # [B, G, W·B·K]
        group = (has.long() * own[:, :, None]).sum(dim=1)  # [B, W·B·K]: the carrier where pos_img
        logits_img = scale * torch.where(pos_img, per_group.gather(1, group[:, None]).squeeze(1),
                                         per_group.max(dim=1).values)
        per_group_t = torch.einsum("mgd,pd->pmg", all_images, nouns)  # [B·K, W·B, G]
        group_t = (had.long() * carrier[None]).sum(dim=-1)  # [B·K, W·B]
        logits_text = scale * torch.where(pos_text, per_group_t.gather(2, group_t[..., None]).squeeze(-1),
                                          per_group_t.max(dim=-1).values)
    else:
        logits_img = scale * _similarity(image, all_nouns)  # [B, W·B·K]
        logits_text = scale * _similarity(all_images, nouns).t()  # [B·K, W·B]
    return 0.5 * (_soft_targets(logits_img.masked_fill(~nouns_in[None], float("-inf")), pos_img)
                  + _soft_targets(logits_text, pos_text))


def noun_groups(groups: torch.Tensor, nouns: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The group that carries each noun of an image, no group carrying two: groups [N, G, D] and the image's own
    prompts nouns [N, K, D] (unit vectors), ids [N, K] → [N, K] group indices, by an exact assignment that
    maximises the summed cosines (a caption's nouns are distinct; fillers, id < 0, take groups left over). With
    fewer groups than prompts, a prompt left unassigned gets its best-matching group."""
    from .model.matching import linear_sum_assignment  # (pgseg.model imports this module)

    cos = torch.einsum("ngd,nkd->ngk", groups.detach(), nouns.detach())
    best = cos.argmax(dim=1)  # [N, K]
    cost = cos.masked_fill((ids < 0)[:, None, :], -4.0)  # < any cosine
    rows, cols = linear_sum_assignment(cost, maximize=True, ties="any")
    return best.scatter(1, cols, rows)


def _soft_targets(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row's softmax against the uniform distribution over its positives, averaged over the
    rows that have one (0 when none has)."""
    counts = positives.sum(dim=1)
    rows = counts > 0
    log_probs = F.log_softmax(logits, dim=-1).masked_fill(~positives, 0.0)
    per_row = -(log_probs.sum(dim=1) / counts.clamp(min=1))
    return torch.where(rows.any(), (per_row * rows).sum() / rows.sum().clamp(min=1), logits.new_zeros(()))
