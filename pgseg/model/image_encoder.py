"""GroupViT-style image encoder with PG units (SPEC §2.1): patch embedding, grouping stages, a last plain stage."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from ..config import ImageEncoderConfig
from .grouping import Assignment, GroupingBlock
from .layers import ProjectMLP, TokenMlp, init_vit_weights
from .npr import PrototypeUnit


class PatchEmbed(nn.Module):
    """Conv patch embedding + LayerNorm → [B, N, C] and the patch grid (h, w)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # [B, C, h, w]
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


@dataclass
class StageOutput:
    """What one grouping stage exposes: its assignment, NPR prototypes (or None) and input tokens."""

    assignment: Assignment
    prototypes: torch.Tensor | None  # [B, M, C]
    input_tokens: torch.Tensor  # [B, N, C] the EM source


@dataclass
class ImageOutput:
    pooled: torch.Tensor  # [B, C] mean of the final tokens after the final LayerNorm
    tokens: torch.Tensor  # [B, G_last, C] final tokens after the final LayerNorm
    stages: list[StageOutput] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)  # patch grid (h, w) of the input


class GroupingLayer(nn.Module):
    """One stage: transformer blocks over [tokens ; group tokens], then (if it groups) a PG unit and a grouping
    block. Attribute names follow the released layout (``downsample`` = grouping block, ``downsample_spatial`` =
    PG unit)."""

    def __init__(self, dim: int, depth: int, num_heads: int, num_group_token: int, num_output_group: int | None,
                 prev_group_token: int | None, cfg: ImageEncoderConfig, drop_path: list[float],
                 num_prototypes: int | None, em_iters: int, proj_hidden_dim: int, proj_num_layers: int):
        super().__init__()
        self.num_group_token = num_group_token
        if num_group_token > 0:
            self.group_token = nn.Parameter(torch.zeros(1, num_group_token, dim))
            if prev_group_token is None:
                trunc_normal_(self.group_token, std=0.02)
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop=cfg.drop_rate,
                  attn_drop=cfg.attn_drop_rate, drop_path=drop_path[i], norm_layer=nn.LayerNorm)
            for i in range(depth)
        ])
        self.downsample = None
        self.downsample_spatial = None
        if num_output_group is not None:
            self.downsample = GroupingBlock(dim, num_heads, num_group_token, num_output_group,
                                            token_mlp_ratio=cfg.token_mlp_ratio, mlp_ratio=cfg.mlp_ratio,
                                            hard=cfg.hard_assignment, gumbel=cfg.gumbel, gumbel_tau=cfg.gumbel_tau,
                                            assign_eps=cfg.assign_eps, centre_residual=cfg.centre_residual)
            if num_prototypes is not None:
                self.downsample_spatial = PrototypeUnit(dim, num_prototypes, em_iters, proj_hidden_dim, proj_num_layers)
        self.group_projector = None
        if prev_group_token is not None and num_group_token > 0:
            # stage-1 group tokens get a token-mixing MLP of the previous stage's group tokens added
            self.group_projector = nn.Sequential(
                nn.LayerNorm(dim), TokenMlp(prev_group_token, int(dim * cfg.token_mlp_ratio), num_group_token))

    def forward(self, x: torch.Tensor, prev_groups: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, StageOutput | None]:
        stage_input = x  # [B, N, C] NPR's EM source: the tokens before this stage's blocks
        n = x.shape[1]
        if self.num_group_token > 0:
            groups = self.group_token.expand(x.shape[0], -1, -1)
            if self.group_projector is not None:
                groups = groups + self.group_projector(prev_groups)
            x = torch.cat([x, groups], dim=1)  # [B, N + G_in, C]
        for block in self.blocks:
            x = block(x)
        x, groups = (x[:, :n], x[:, n:]) if self.num_group_token > 0 else (x, None)
        if self.downsample is None:
            return x, groups, None
        prototypes = None
        if self.downsample_spatial is not None:
            prototypes, recon = self.downsample_spatial(stage_input)
            x = x + recon  # the reconstruction feeds the cross-attention and the assignment
        x, assignment = self.downsample(x, groups)
        return x, groups, StageOutput(assignment, prototypes, stage_input)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig, num_prototypes: list[int] | None, em_iters: int = 10,
                 proj_hidden_dim: int = 4096, proj_num_layers: int = 2):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.train_grid = (cfg.img_size // cfg.patch_size,) * 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.train_grid[0] * self.train_grid[1], dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        n_stages = len(cfg.depths)
        self.layers = nn.ModuleList()
        for s in range(n_stages):
            grouping = s < n_stages - 1
            self.layers.append(GroupingLayer(
                dim, cfg.depths[s], cfg.num_heads[s], cfg.num_group_tokens[s],
                cfg.num_output_groups[s] if grouping else None,
                cfg.num_group_tokens[s - 1] if s > 0 else None,
                cfg, rates[sum(cfg.depths[:s]):sum(cfg.depths[:s + 1])],
                num_prototypes[s] if (grouping and num_prototypes is not None) else None,
                em_iters, proj_hidden_dim, proj_num_layers))
        self.norm = nn.LayerNorm(dim)
        self.apply(init_vit_weights)
        for m in self.modules():  # the projectors keep PyTorch's default init, like the released 1×1 convs
            if isinstance(m, ProjectMLP):
                m.reset_parameters()

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The learned [1, N, C] embedding, bicubically resized from the training grid when the grid differs."""
        if grid == self.train_grid:
            return self.pos_embed
        h0, w0 = self.train_grid
        pe = self.pos_embed.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=grid, mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)

    def forward(self, images: torch.Tensor) -> ImageOutput:
        x, grid = self.patch_embed(images)  # [B, N, C]
        x = self.pos_drop(x + self.position_embedding(grid))
        groups = None
        stages: list[StageOutput] = []
        for layer in self.layers:
            x, groups, stage = layer(x, groups)
            if stage is not None:
                stages.append(stage)
        tokens = self.norm(x)  # [B, G_last, C]
        return ImageOutput(pooled=tokens.mean(dim=1), tokens=tokens, stages=stages, grid=grid)
