"""The whole PGSeg model: image encoder with PG units, text encoder with T-NPR, projectors, temperatures, and the
training forward that returns every loss term (SPEC §2.4, §2.5, §3)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..config import Config, LossConfig, ModelConfig, NPRConfig
from ..distributed import SINGLE, Collectives
from ..losses import contrastive_loss, multi_label_loss
from . import text_encoder
from .image_encoder import ImageEncoder, ImageOutput
from .layers import ProjectMLP
from .npr import ema_, pg_loss
from .text_encoder import TextEncoder

Mean = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ImageEmbedding:
    x: torch.Tensor  # [B, D] projected pooled feature (the zero-shot image embedding, unnormalised)
    groups: torch.Tensor | None  # [B, G_last, D] projected final segment tokens (unnormalised), if asked for
    out: ImageOutput


@dataclass
class TextEmbedding:
    x: torch.Tensor  # [B, D] projected EOT feature (unnormalised)
    feature: torch.Tensor  # [B, W] EOT feature before the projector
    prototypes: torch.Tensor | None  # [B, G_text, 1] T-NPR prototypes


@dataclass
class TrainOutput:
    loss: torch.Tensor  # the total to backpropagate
    terms: dict[str, torch.Tensor]  # each weighted loss term (detached)
    metrics: dict[str, torch.Tensor]  # detached scalars (no host sync here): hrs kept fractions, scales, T-NPR grad norm
    prototypes: dict[str, torch.Tensor] = field(default_factory=dict)  # for ema_step


class PGSeg(nn.Module):
    """Build with :meth:`from_config`. Parameter names follow the released layout (see :mod:`pgseg.checkpoint`)."""

    def __init__(self, model: ModelConfig, npr: NPRConfig, loss: LossConfig | None = None,
                 world: Collectives = SINGLE):
        super().__init__()
        self.world = world  # the training forward's collectives (the global batch, the prototype EMA); set once
        self.model_cfg = model
        self.npr = npr.resolved()
        self.loss_cfg = loss or LossConfig()
        img, txt = model.image, model.text
        self.img_encoder = ImageEncoder(img, self.npr.prototypes_per_stage(img) if self.npr.enabled else None,
                                        self.npr.em_iters, model.proj_hidden_dim, model.proj_num_layers)
        self.text_encoder = TextEncoder(txt, self.npr.text_prototypes if self.npr.enabled else None, self.npr.em_iters)
        self.img_projector = ProjectMLP(img.embed_dim, model.output_dim, model.proj_hidden_dim, model.proj_num_layers)
        self.text_projector = ProjectMLP(txt.width, model.output_dim, model.proj_hidden_dim, model.proj_num_layers)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / model.contrast_temperature)))
        if self.npr.enabled:  # the PG-loss temperature lives on the image encoder in the released layout
            self.img_encoder.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.npr.tau)),
                                                        requires_grad=self.npr.pg_temperature == "learnable")
        if self.loss_cfg.multi_label > 0 and not self.loss_cfg.share_temperature:
            self.multi_label_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / model.contrast_temperature)))

    @classmethod
    def from_config(cls, config: Config, world: Collectives = SINGLE) -> "PGSeg":
        return cls(config.model, config.npr, config.loss, world)

    # ------------------------------------------------------------------------------------------------ scales
    def _clamped(self, log_scale: torch.Tensor) -> torch.Tensor:
        return log_scale.exp().clamp(max=self.model_cfg.logit_scale_max)

    def itc_scale(self) -> torch.Tensor:
        return self._clamped(self.logit_scale)

    def pg_scale(self) -> torch.Tensor:
        return self._clamped(self.img_encoder.logit_scale)

    # ------------------------------------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor, groups: bool = True) -> ImageEmbedding:
        """The projected pooled feature, and with ``groups`` the projected final segment tokens too (segmentation).
        Training asks without: the projector then runs once per step, on the pooled feature only, so its
        BatchNorm statistics move once per step as in the release."""
        out = self.img_encoder(images)
        return ImageEmbedding(self.img_projector(out.pooled), self.img_projector(out.tokens) if groups else None, out)

    def compile_encoders(self) -> None:
        """torch.compile (in place: the parameter names stay) the image and text encoders, where a step's time goes.
        The losses stay eager: NPR's matching is solved on the host, and the T-NPR gradient-norm metric takes a
        second backward (``retain_graph``) that a compiled graph's donated buffers would not allow."""
        self.img_encoder.compile()
        self.text_encoder.compile()

    def sync_batchnorm(self) -> None:
        """Multi-GPU: the image and text projectors' BatchNorm over the global batch (SyncBatchNorm), as the
        release; the NPR ``mapping_x`` BatchNorms stay per-rank, as they are there."""
        self.img_projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.img_projector)
        self.text_projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.text_projector)

    def encode_text(self, tokens: torch.Tensor, *, mean: Mean | None = None) -> TextEmbedding:
        """Text embeddings; with T-NPR also the text prototypes. In ``text_ema: every_forward`` (released) mode the
        text-prototype buffer is updated here, on every call, in evaluation too."""
        feature = self.text_encoder(tokens, text_encoder.used_columns(tokens))  # the padding after EOT: no work
        prototypes = None
        if self.text_encoder.Atten is not None:
            prototypes = self.text_encoder.Atten(feature)
            if self.npr.text_ema == "every_forward":
                ema_(self.text_encoder.Atten.mu, prototypes, self.npr.gamma, mean)
        return TextEmbedding(self.text_projector(feature), feature, prototypes)

    @torch.no_grad()
    def class_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N_classes, N_templates, L] prompt tokens → [N_classes, D]: the mean of the unnormalised projections over
        templates, then L2-normalised (SPEC §6)."""
        n, t, length = tokens.shape
        x = self.encode_text(tokens.reshape(n * t, length)).x.reshape(n, t, -1).mean(dim=1)
        return nn.functional.normalize(x, dim=-1)

    # ------------------------------------------------------------------------------------------------ training
    def npr_active(self, step: int, epoch: int) -> bool:
        return step >= self.npr.start_step and epoch >= self.npr.start_epoch

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, noun_tokens: torch.Tensor | None = None, *,
                noun_ids: torch.Tensor | None = None, step: int = 0, epoch: int = 0) -> TrainOutput:
        """The training forward: images [B, 3, H, W], caption tokens [B, L], optional noun prompts [B, K, L] and
        their noun ids [B, K] (-1: the caption standing in for a noun; the group-level loss uses them), at training
        ``step`` of ``epoch`` (NPR may start later). The losses run over the global batch of ``self.world``.
        """
        npr, world = self.npr, self.world
        text = self.encode_text(tokens, mean=world.mean)
        group_nouns = noun_tokens is not None and self.loss_cfg.multi_label > 0 and self.loss_cfg.group_nouns_weight > 0
        image = self.encode_image(images, groups=group_nouns)
        itc_scale = self.itc_scale()
        terms: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {"itc_scale": itc_scale.detach()}
        terms["itc"] = self.loss_cfg.itc_weight * contrastive_loss(image.x, text.x, itc_scale, world)
        if noun_tokens is not None and self.loss_cfg.multi_label > 0:
            b, k, length = noun_tokens.shape
            nouns = self.encode_text(noun_tokens.reshape(b * k, length), mean=world.mean).x.reshape(b, k, -1)
            scale = itc_scale if self.loss_cfg.share_temperature else self._clamped(self.multi_label_logit_scale)
            terms["multi_label"] = self.loss_cfg.multi_label_weight * multi_label_loss(image.x, nouns, scale, world)
            if group_nouns:  # the groups themselves, as segmentation will name them: nouns only (a caption that
                # stands in for a missing noun names the whole image, which no one group should carry)
                if noun_ids is None:  # no ids: every prompt its own noun, but for the caption standing in
                    caption = (noun_tokens == tokens[:, None, :noun_tokens.shape[-1]]).all(dim=-1)  # [B, K]
                    noun_ids = torch.arange(b * k, device=caption.device).reshape(b, k) + world.rank * b * k
                    noun_ids = noun_ids.masked_fill(caption, -1)
                terms["group_nouns"] = self.loss_cfg.group_nouns_weight * multi_label_loss(
                    image.groups, nouns, scale, world, ids=noun_ids,
                    exclusive=self.loss_cfg.group_nouns_match == "exclusive")
        stages = image.out.stages
        prototypes = {f"stage{s}": st.prototypes for s, st in enumerate(stages) if st.prototypes is not None}
        if text.prototypes is not None:
            prototypes["text"] = text.prototypes
        if npr.enabled and self.npr_active(step, epoch) and (npr.i_npr or npr.t_npr):
            scale = self.pg_scale()
            metrics["pg_scale"] = scale.detach()
            common = dict(maximize=npr.matching == "max_similarity", ties=npr.matching_ties, hrs=npr.hrs,
                          phi=npr.phi, hrs_rule=npr.hrs_rule, reduction=npr.pg_reduction, grad_eps=npr.grad_eps)
            if npr.i_npr:
                for s, st in enumerate(stages):
                    result = pg_loss(st.assignment.centres, st.prototypes, scale, **common)
                    terms[f"pg_stage{s}"] = npr.lambda_ * result.loss
                    metrics[f"hrs_kept_stage{s}"] = result.kept_fraction.detach()
            if npr.t_npr:
                centres = stages[-1].assignment.centres  # [B, G, C]
                avg = centres.mean(dim=-1, keepdim=True)  # AVG(G): [B, G, 1]
                result = pg_loss(avg, text.prototypes, scale, **common)
                terms["pg_text"] = npr.beta * result.loss
                metrics["hrs_kept_text"] = result.kept_fraction.detach()
                if terms["pg_text"].requires_grad:
                    (grad,) = torch.autograd.grad(terms["pg_text"], centres, retain_graph=True, allow_unused=True)
                    metrics["tnpr_grad_norm"] = centres.new_zeros(()) if grad is None else grad.norm().detach()
        total = sum(terms.values())
        return TrainOutput(total, {k: v.detach() for k, v in terms.items()}, metrics, prototypes)

    @torch.no_grad()
    def ema_step(self, prototypes: dict[str, torch.Tensor]) -> None:
        """After the optimiser step: the prototype EMA the config asks for (image: paper; text: ``train_step``),
        averaged over ``self.world``."""
        mean = self.world.mean
        if self.npr.image_ema:
            for s, layer in enumerate(layer for layer in self.img_encoder.layers if layer.downsample is not None):
                if layer.downsample_spatial is not None and f"stage{s}" in prototypes:
                    ema_(layer.downsample_spatial.mu, prototypes[f"stage{s}"], self.npr.gamma, mean)
        if self.npr.text_ema == "train_step" and "text" in prototypes and self.text_encoder.Atten is not None:
            ema_(self.text_encoder.Atten.mu, prototypes["text"], self.npr.gamma, mean)
