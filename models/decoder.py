"""The one MAE decoder, shared by the methods whose decoder is MAE's (UM-MAE, MAE-ViT, GreenMIM):
``decoder_*`` modules, a ``mask_token`` and fixed sin-cos positions, computing only the rows the
loss reads while training."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .layers import OuterNorm
from .pos_embed import sincos_2d

__all__ = ["MAEDecoder", "block_rows", "masked_rows"]


class MAEDecoder:
    """The one MAE decoder (mixin): ``decoder_*`` modules, ``mask_token``, fixed sin-cos positions."""

    def _build_decoder(self, encoder_dim: int, grid: int, unit: int, in_chans: int, embed_dim: int, depth: int,
                       num_heads: int, mlp_ratio: float, expand: int, cls_token: bool) -> None:
        self.decoder_embed = nn.Linear(encoder_dim, embed_dim * expand)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(embed_dim, grid, cls_token), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=OuterNorm) for _ in range(depth)])
        self.decoder_norm = OuterNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, unit * unit * in_chans)

    def _decode(self, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """x: (N, S, D) decoder tokens -> (N, S, out) predictions.

        With ``rows`` (N, R), only those tokens' predictions are computed (the others are 0):
        in the last block the other tokens serve only as keys and values, so their query,
        projection, MLP and prediction are skipped. The loss reads only the removed units,
        and the decoder is about half of a UM-MAE step, so training passes them here.
        """
        blocks = list(self.decoder_blocks)
        if rows is None or not blocks:
            for blk in blocks:
                x = blk(x)
            return self.decoder_pred(self.decoder_norm(x))
        for blk in blocks[:-1]:
            x = blk(x)
        y = self.decoder_pred(self.decoder_norm(block_rows(blocks[-1], x, rows)))
        out = y.new_zeros(x.shape[0], x.shape[1], y.shape[-1])
        return out.scatter(1, rows.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)


def block_rows(blk: Block, x: Tensor, rows: Tensor) -> Tensor:
    """A timm ``Block`` evaluated for the tokens ``rows`` (N, R) only; all tokens are keys/values."""
    n, length, d = x.shape
    attn = blk.attn
    heads, hd = attn.num_heads, d // attn.num_heads
    h = blk.norm1(x)
    w, b = attn.qkv.weight, attn.qkv.bias
    kv = F.linear(h, w[d:], None if b is None else b[d:]).view(n, length, 2, heads, hd).permute(2, 0, 3, 1, 4)
    idx = rows.unsqueeze(-1).expand(-1, -1, d)
    xr = x.gather(1, idx)
    q = F.linear(h.gather(1, idx), w[:d], None if b is None else b[:d]).view(n, -1, heads, hd).transpose(1, 2)
    o = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(kv[0]), kv[1])
    o = attn.proj(attn.norm(o.transpose(1, 2).reshape(n, -1, d)))
    xr = xr + blk.drop_path1(blk.ls1(o))
    return xr + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(xr))))


def masked_rows(mask: Tensor, num_masked: int) -> Tensor:
    """Raster indices of the removed units: (N, num_masked)."""
    return torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :num_masked]
