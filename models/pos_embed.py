"""Fixed 2-D sin-cos position embeddings and their resizing."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> Tensor:
    """MAE's 2-D sin-cos table over a ``grid_size x grid_size`` grid.

    The first ``embed_dim/2`` channels encode the column, the last half the row;
    each half is ``[sin(p * w_k)] + [cos(p * w_k)]`` with
    ``w_k = 10000 ** (-k / (embed_dim/4))``. Computed in float64 and rounded to
    float32, which reproduces the reference tables bit for bit.

    Returns: (1, grid_size**2 [+1], embed_dim) float32; row 0 is zeros when ``cls_token``.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(p: Tensor) -> Tensor:
        angles = p.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float().unsqueeze(0)


def resize_pos_embed(pos_embed: Tensor, new_grid: int, num_extra_tokens: int) -> Tensor:
    """Bicubic resize of a square position-embedding grid, keeping the leading
    ``num_extra_tokens`` (cls) rows as they are.

    pos_embed: (1, extra + g*g, C) -> (1, extra + new_grid**2, C)
    """
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} tokens is not a square grid")
    if old == new_grid:
        return pos_embed
    c = grid.shape[-1]
    grid = grid.reshape(1, old, old, c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, c).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)
