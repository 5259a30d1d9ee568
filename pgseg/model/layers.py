"""Small layer pieces shared by the encoders. Parameter names follow the released layout (SPEC §7), so a released
state_dict maps onto ours key for key."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_


class ProjectMLP(nn.Module):
    """Linear → BatchNorm → ReLU → Linear, applied to [B, C] or [B, L, C] (BN statistics over B·L).

    The released code builds it from 1×1 Conv1d; :mod:`pgseg.checkpoint` drops their trailing kernel dimension.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 4096, num_layers: int = 2):
        super().__init__()
        if num_layers == 2:
            self.linear_hidden = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True))
            self.linear_out = nn.Linear(hidden_dim, out_dim)
        elif num_layers == 1:
            self.linear_hidden = nn.Sequential()
            self.linear_out = nn.Linear(in_dim, out_dim)
        else:
            raise ValueError(f"ProjectMLP: num_layers must be 1 or 2, got {num_layers}")

    def reset_parameters(self) -> None:
        """PyTorch's default Linear init (the released 1×1 convs have the same one)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.BatchNorm1d)):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [B·L, C]
        x = self.linear_out(self.linear_hidden(x))
        return x.reshape(*shape[:-1], x.shape[-1])


class TokenMlp(Mlp):
    """timm's Mlp applied along the token axis: [B, N_in, C] → [B, N_out, C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections: queries attend over a different token set."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, h, N, C/h]

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(key))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(query.shape)  # [B, N_q, C]
        return self.proj_drop(self.proj(out))


class CrossAttnBlock(nn.Module):
    """Post-norm cross-attention block: q = q + Attn(q, x); q = q + MLP(LN(q)); q = LN(q)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.norm_post = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        x = query + self.drop_path(self.attn(query, key))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return self.norm_post(x)


def init_vit_weights(module: nn.Module) -> None:
    """The released init: Linear trunc-normal(0.02) with zero bias; LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
