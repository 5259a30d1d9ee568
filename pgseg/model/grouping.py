"""The grouping block (SPEC §2.2): group centres by cross-attention, then a hard assignment of every token to a
group (softmax over the groups, straight-through one-hot), then one segment token per group."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import Mlp

from .layers import CrossAttnBlock


def straight_through_one_hot(y_soft: torch.Tensor, dim: int) -> torch.Tensor:
    """One-hot of the argmax along ``dim`` in the forward pass, gradient of ``y_soft`` in the backward pass."""
    index = y_soft.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Samples of Gumbel(0, 1) shaped like ``like``."""
    return -torch.empty_like(like).exponential_().log()


@dataclass
class Assignment:
    """What a grouping stage decided: ``soft`` (softmax over groups, no noise) is what inference uses."""

    soft: torch.Tensor  # [B, G, N]
    hard: torch.Tensor  # [B, G, N] straight-through one-hot (Gumbel-perturbed in training)
    centres: torch.Tensor  # [B, G, C] group centres supervised by NPR


class AssignAttention(nn.Module):
    """Single-head assignment of N tokens to G groups; returns the G segment tokens and the assignment."""

    def __init__(self, dim: int, qkv_bias: bool = True, hard: bool = True, gumbel: bool = True,
                 gumbel_tau: float = 1.0, assign_eps: float = 1.0):
        super().__init__()
        self.scale = dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.hard, self.gumbel, self.gumbel_tau, self.assign_eps = hard, gumbel, gumbel_tau, assign_eps

    def forward(self, groups: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = (self.q_proj(groups) @ self.k_proj(x).transpose(1, 2)) * self.scale  # [B, G, N]
        soft = logits.softmax(dim=1)  # every token picks a group
        if self.training and self.gumbel:
            y = ((logits + gumbel_noise(logits)) / self.gumbel_tau).softmax(dim=1)
        else:
            y = soft
        attn = straight_through_one_hot(y, dim=1) if self.hard else y
        weights = attn / (attn.sum(dim=-1, keepdim=True) + self.assign_eps)  # each group averages its tokens
        out = self.proj(weights @ self.v_proj(x))  # [B, G, C]
        return out, soft, attn


class GroupingBlock(nn.Module):
    """G_in group tokens + N image tokens → G_out segment tokens (names follow the released layout)."""

    def __init__(self, dim: int, num_heads: int, num_group_token: int, num_output_group: int,
                 token_mlp_ratio: float = 0.5, mlp_ratio: float = 4.0, hard: bool = True, gumbel: bool = True,
                 gumbel_tau: float = 1.0, assign_eps: float = 1.0, centre_residual: bool = True):
        super().__init__()
        self.centre_residual = centre_residual
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = Mlp(num_group_token, int(dim * token_mlp_ratio), num_output_group)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True)
        self.assign = AssignAttention(dim, qkv_bias=True, hard=hard, gumbel=gumbel, gumbel_tau=gumbel_tau,
                                      assign_eps=assign_eps)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor) -> tuple[torch.Tensor, Assignment]:
        group_tokens = self.norm_tokens(group_tokens)  # [B, G_in, C]
        x = self.norm_x(x)  # [B, N, C]
        # token-axis MLP G_in → G_out, then LayerNorm
        centres = self.norm_post_tokens(self.mlp_inter(group_tokens.transpose(1, 2)).transpose(1, 2))
        centres = self.pre_assign_attn(centres, x)  # [B, G_out, C] the group centres
        segments, soft, hard = self.assign(centres, x)
        if self.centre_residual:
            segments = segments + centres
        segments = segments + self.mlp_channels(self.norm_new_x(segments))
        return segments, Assignment(soft=soft, hard=hard, centres=centres)


__all__ = ["Assignment", "AssignAttention", "GroupingBlock", "gumbel_noise", "straight_through_one_hot"]
