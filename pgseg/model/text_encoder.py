"""CLIP-style causal text transformer (SPEC §2.3), built on open_clip's Transformer (same parameter names as the
released ``TextTransformer``). The feature is the final-LN output at the EOT position (argmax of the token ids)."""
from __future__ import annotations

import torch
import torch.nn as nn
from open_clip.transformer import LayerNorm, QuickGELU, Transformer

from ..config import TextEncoderConfig
from .npr import TextPrototypes


def used_columns(tokens: torch.Tensor, multiple: int = 8) -> int:
    """How many leading columns of ``tokens`` [B, L] the EOT features depend on: through the batch's last EOT (the
    argmax of a row), rounded up to a multiple of ``multiple`` (fewer shapes for torch.compile), at most L. Under the
    causal mask no position sees a later one, so cutting the padding after it changes no EOT feature (float noise
    aside) and saves the text tower most of its work on short captions and class prompts. One host read of a scalar
    (a wait on a GPU; it comes first in the training forward, behind only the previous step's queue); taken outside
    the encoder (PGSeg.encode_text), so a compiled encoder has no graph break."""
    last = int(tokens.argmax(dim=-1).max()) + 1
    return min(tokens.shape[1], -(-last // multiple) * multiple)


class TextEncoder(nn.Module):
    """``text_prototypes``: number of T-NPR prototypes (its buffer is ``Atten.mu``, the released name); None = no T-NPR."""

    def __init__(self, cfg: TextEncoderConfig, text_prototypes: int | None = None, em_iters: int = 10):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, act_layer=QuickGELU, norm_layer=LayerNorm,
                                       batch_first=True)
        self.ln_final = LayerNorm(cfg.width)
        self.register_buffer("attn_mask", torch.full((cfg.context_length,) * 2, float("-inf")).triu_(1),
                             persistent=False)
        self._init_weights()
        self.Atten = TextPrototypes(text_prototypes, em_iters) if text_prototypes else None

    def _init_weights(self) -> None:
        """CLIP's init."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.cfg.width, max(self.cfg.layers, 1)
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, tokens: torch.Tensor, columns: int | None = None) -> torch.Tensor:
        """``tokens`` [B, L] CLIP BPE ids (L ≤ context_length) → feature [B, width]; only their first ``columns``
        (:func:`used_columns`) are encoded when given."""
        if tokens.ndim != 2 or tokens.shape[1] > self.cfg.context_length:
            raise ValueError(f"text tokens must be [B, L] with L <= {self.cfg.context_length}, got {tuple(tokens.shape)}")
        tokens = tokens[:, :columns]
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]  # [B, L, W]
        x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # [B, W] at EOT
