"""UM-MAE masked autoencoders: pyramid (Swin, PVT) and ViT.

Pyramid models (UM-MAE, arXiv 2205.10063):
  1. Uniform Sampling keeps one 16-px unit in every 2x2 group; the kept units are
     gathered into a half-resolution *compact image* that keeps the layout
     (group (a, b) -> compact unit (a, b)), so Swin windows and PVT reductions stay
     local.
  2. Secondary Masking replaces 25% of the kept units by a learnable token
     (``vis_mask_token``, LayerNorm-ed by the Swin patch embedding).
  3. The encoder runs on the compact image; its 1/32-resolution output is
     projected and pixel-shuffled to one token per group.
  4. The decoder sees every unit: kept units carry their group's token,
     removed units the ``mask_token``, each plus a fixed sin-cos position; it
     predicts 16x16x3 pixels per unit. Loss: (norm-pix) MSE on removed units only.

Decoder position order. The reference adds to the token of group t the position
of the t-th kept unit in *raster* order rather than of group t's own unit, so
most visible decoder tokens get another unit's position.
``reference_decoder_order=False`` (default) gives each token its own unit's
position; ``True`` reproduces the reference exactly, which the released full
checkpoints need for faithful reconstructions.

All returned predictions are in raster unit order: ``pred[:, u]`` is unit u.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .contract import PretrainModel
from .layers import check_images_and_mask, OuterNorm, init_reference_weights, valid_sizes_message
from .loss import mae_loss
from .masking import check_uniform_mask, kept_index_per_group, secondary_mask
from .pos_embed import sincos_2d
from .pvt import _PVT_SIZES, PVTEncoder, pvt_grid_ok
from .registry import register_named
from .swin import _SWIN_SIZES, Positions, SwinEncoder, swin_grid_ok
from .vit import VIT_SIZES

__all__ = ["MaskedAutoencoderSwin", "MaskedAutoencoderPVT", "MaskedAutoencoderViT", "compact_map"]


def compact_map(x: Tensor, kept: Tensor, unit: int) -> Tensor:
    """Gather the kept unit of every 2x2 group into the group's place.

    x: (P, T*unit, T*unit, C) channel-last map (P = N, or 1 to share it across the batch);
    kept: (N, T/2, T/2) cell index 0..3 (TL, TR, BL, BR).
    Returns: (N, T/2*unit, T/2*unit, C).
    """
    p, h, w, c = x.shape
    n, g, _ = kept.shape
    v = x.view(p, g, 2, unit, g, 2, unit, c)
    dev = kept.device
    bi = (torch.arange(n, device=dev) if p == n else torch.zeros(n, dtype=torch.long, device=dev)).view(n, 1, 1)
    ai = torch.arange(g, device=dev).view(1, g, 1)
    bj = torch.arange(g, device=dev).view(1, 1, g)
    out = v[bi, ai, kept // 2, :, bj, kept % 2]                # (N, g, g, unit, unit, C)
    return out.permute(0, 1, 3, 2, 4, 5).reshape(n, g * unit, g * unit, c)


class _MAEDecoder:
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
        y = self.decoder_pred(self.decoder_norm(_block_rows(blocks[-1], x, rows)))
        out = y.new_zeros(x.shape[0], x.shape[1], y.shape[-1])
        return out.scatter(1, rows.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)


def _block_rows(blk: Block, x: Tensor, rows: Tensor) -> Tensor:
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


def _masked_rows(mask: Tensor, num_masked: int) -> Tensor:
    """Raster indices of the removed units: (N, num_masked)."""
    return torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :num_masked]


class _PyramidMAE(_MAEDecoder, PretrainModel):
    """UM-MAE logic shared by the Swin and PVT autoencoders (mixin).

    Subclasses provide ``_sm_token()`` and ``_encode_compact(x, kept) -> stage outputs``.
    """

    family = "um-mae"
    mask_kind = "uniform"  # compaction needs exactly one kept unit per 2x2 group
    build_options = ("reference_decoder_order",)

    def _setup(self, img_size: int, patch_size: int, stride: int, in_chans: int, decoder_embed_dim: int,
               decoder_depth: int, decoder_num_heads: int, decoder_mlp_ratio: float, norm_pix_loss: bool,
               vis_mask_ratio: float, reference_decoder_order: bool) -> None:
        self.stride = stride
        self.token_size = img_size // stride
        self.unit_tokens = stride // patch_size
        self.norm_pix_loss = norm_pix_loss
        self.vis_mask_ratio = vis_mask_ratio
        self.reference_decoder_order = reference_decoder_order
        self.norm = OuterNorm(self.num_features)
        if vis_mask_ratio > 0:
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, self.stage_dims[0]))
        self._build_decoder(self.num_features, self.token_size, stride, in_chans, decoder_embed_dim,
                            decoder_depth, decoder_num_heads, decoder_mlp_ratio, expand=4, cls_token=False)
        init_reference_weights(self)
        for name in ("mask_token", "vis_mask_token"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=0.02)

    def _check_inputs(self, imgs: Tensor, mask: Tensor) -> None:
        check_images_and_mask(self, imgs, mask)
        check_uniform_mask(mask.bool(), self.token_size)

    def forward_encoder(self, imgs: Tensor, mask: Tensor, sm_mask: Optional[Tensor] = None,
                        return_intermediates: bool = False):
        """imgs: (N, 3, H, W); mask: (N, T*T) uniform, True = removed; sm_mask: (N, T*T) or None.

        Returns latent (N, T/4, T/4, C_last), kept (N, T/2, T/2), and (optionally) a dict of intermediates.
        """
        mask = mask.bool()
        self._check_inputs(imgs, mask)
        t, k, g = self.token_size, self.unit_tokens, self.token_size // 2
        kept = kept_index_per_group(mask, t)
        compact = compact_map(imgs.permute(0, 2, 3, 1), kept, self.stride)        # (N, H/2, W/2, 3)
        x = self.patch_embed(compact.permute(0, 3, 1, 2))                         # (N, h, w, C)
        if self.vis_mask_ratio > 0:
            if sm_mask is None:
                sm_mask = secondary_mask(mask, self.vis_mask_ratio)
            cells = sm_mask.bool().view(-1, g, 2, g, 2).permute(0, 1, 3, 2, 4).reshape(-1, g, g, 4)
            sm_group = cells.gather(-1, kept.unsqueeze(-1)).squeeze(-1)           # (N, g, g)
            sm_tokens = sm_group[:, :, None, :, None].expand(-1, g, k, g, k).reshape(x.shape[:3]).unsqueeze(-1)
            x = torch.where(sm_tokens, self._sm_token().to(x.dtype), x)
        inter: dict = {}
        outs = self._encode_compact(x, kept, inter)
        latent = self.norm(outs[-1])
        if return_intermediates:
            inter["stages"] = outs
            return latent, kept, inter
        return latent, kept

    def forward_decoder(self, latent: Tensor, kept: Tensor, return_tokens: bool = False,
                        rows: Optional[Tensor] = None):
        """latent: (N, T/4, T/4, C_last) -> pred (N, T*T, stride*stride*3) in raster unit order
        (only the units ``rows`` (N, R) when given; the others are 0)."""
        n, q, _, _ = latent.shape
        g, t = 2 * q, self.token_size
        x = self.decoder_embed(latent)
        d = x.shape[-1] // 4
        # pixel shuffle: out[c, 2h+i, 2w+j] = in[4c + 2i + j, h, w]  -> one token per group
        groups = x.view(n, q, q, d, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(n, g, g, d)
        keep = F.one_hot(kept, 4).bool().view(n, g, g, 2, 2).permute(0, 1, 3, 2, 4)
        tokens = torch.where(keep.unsqueeze(-1), groups[:, :, None, :, None, :],
                             self.mask_token.to(x.dtype).view(1, 1, 1, 1, 1, d))
        tokens = tokens.reshape(n, t * t, d)
        pos = self.decoder_pos_embed.to(x.dtype)
        if self.reference_decoder_order:
            vis_units = self.visible_units(kept)
            wrong_rows = pos[0][vis_units.sort(dim=1).values]
            pos = pos.expand(n, -1, -1).scatter(1, vis_units.unsqueeze(-1).expand(-1, -1, d), wrong_rows)
        pred = self._decode(tokens + pos, rows)
        if return_tokens:
            return pred, groups.reshape(n, g * g, d)
        return pred

    def visible_units(self, kept: Tensor) -> Tensor:
        """Raster index of each group's kept unit, groups in raster order: (N, (T/2)**2)."""
        n, g, _ = kept.shape
        a = torch.arange(g, device=kept.device).view(1, g, 1)
        b = torch.arange(g, device=kept.device).view(1, 1, g)
        return ((2 * a + kept // 2) * self.token_size + 2 * b + kept % 2).reshape(n, g * g)

    def forward(self, imgs: Tensor, mask: Tensor, sm_mask: Optional[Tensor] = None):
        """imgs: (N, 3, H, W); mask: (N, L) uniform, True = removed; sm_mask: optional (N, L).

        Returns (loss, pred (N, L, stride*stride*3) raster order, mask). In training mode only the
        removed units are predicted (the rows the loss reads; the others are 0).
        """
        latent, kept = self.forward_encoder(imgs, mask, sm_mask)
        rows = _masked_rows(mask, self.token_size ** 2 - kept[0].numel()) if self.training else None
        pred = self.forward_decoder(latent, kept, rows=rows)
        loss = mae_loss(pred, imgs, mask.bool(), self.stride, self.norm_pix_loss)
        return loss, pred, mask


def _pyramid_size_check(img_size: int, patch_size: int, stride: int, grid_ok, what: str) -> None:
    if stride != 4 * patch_size:
        raise ValueError(f"{what}: the mask unit (stride {stride}) must be 4 patches of {patch_size} px")
    step = 4 * stride

    def ok(s: int) -> bool:
        return s % step == 0 and grid_ok(s // (2 * patch_size))
    if not ok(img_size):
        raise ValueError(valid_sizes_message(img_size, ok, step, what))


class MaskedAutoencoderSwin(_PyramidMAE, SwinEncoder):
    """UM-MAE with the reference Swin encoder (window 8 on the compact image = 16 at full resolution)."""

    def __init__(self, img_size: int = 256, patch_size: int = 4, in_chans: int = 3, stride: int = 16,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 8, mlp_ratio: float = 4.0, posmlp_dim: int = 32,
                 decoder_embed_dim: int = 512, decoder_depth: int = 2, decoder_num_heads: int = 16,
                 decoder_mlp_ratio: float = 4.0, norm_pix_loss: bool = False, vis_mask_ratio: float = 0.0,
                 reference_decoder_order: bool = False) -> None:
        _pyramid_size_check(img_size, patch_size, stride, lambda g: swin_grid_ok(g, window_size),
                            f"UM-MAE Swin (window {window_size} on the compact image)")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depths=depths, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
                         posmlp_dim=posmlp_dim)
        self._setup(img_size, patch_size, stride, in_chans, decoder_embed_dim, decoder_depth, decoder_num_heads,
                    decoder_mlp_ratio, norm_pix_loss, vis_mask_ratio, reference_decoder_order)

    def _sm_token(self) -> Tensor:
        return self.patch_embed.norm(self.vis_mask_token)

    def _encode_compact(self, x: Tensor, kept: Tensor, inter: dict) -> list[Tensor]:
        # True coordinates (in the full token grid) of every compact token: they drive the position MLP.
        n, g, _ = kept.shape
        k = self.unit_tokens
        dev = kept.device
        a = torch.arange(g, device=dev).view(1, g, 1, 1, 1)
        i = torch.arange(k, device=dev).view(1, 1, k, 1, 1)
        j = torch.arange(k, device=dev).view(1, 1, 1, 1, k)
        ki, kj = (kept // 2).view(n, g, 1, g, 1), (kept % 2).view(n, g, 1, g, 1)
        rows = (2 * k * a + k * ki + i).expand(n, g, k, g, k)
        cols = (2 * k * a.view(1, 1, 1, g, 1) + k * kj + j).expand(n, g, k, g, k)
        pos = torch.stack([rows, cols], dim=-1).reshape(n, g * k, g * k, 2)
        extent = 2 * g * k
        inter.update(x0=x, pos0=pos)
        return self.run_blocks(x, Positions(pos, (extent, extent), max_step=k))


class MaskedAutoencoderPVT(_PyramidMAE, PVTEncoder):
    """UM-MAE with the reference PVT encoder (sr 4,2,1,1 on the compact image = 8,4,2,1 at full resolution)."""

    def __init__(self, img_size: int = 256, patch_size: int = 4, in_chans: int = 3, stride: int = 16,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (4, 2, 1, 1), decoder_embed_dim: int = 512, decoder_depth: int = 2,
                 decoder_num_heads: int = 16, decoder_mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 vis_mask_ratio: float = 0.0, reference_decoder_order: bool = False) -> None:
        _pyramid_size_check(img_size, patch_size, stride, lambda g: pvt_grid_ok(g, sr_ratios),
                            f"UM-MAE PVT (sr {list(sr_ratios)} on the compact image)")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dims=embed_dims,
                         depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios, sr_ratios=sr_ratios,
                         learnable_pos=False)
        self._setup(img_size, patch_size, stride, in_chans, decoder_embed_dim, decoder_depth, decoder_num_heads,
                    decoder_mlp_ratio, norm_pix_loss, vis_mask_ratio, reference_decoder_order)

    def _sm_token(self) -> Tensor:
        return self.vis_mask_token

    def _encode_compact(self, x: Tensor, kept: Tensor, inter: dict) -> list[Tensor]:
        # Each compact token carries the absolute position of its original location
        # (secondary-masked units too: the reference compacts positions with the original mask).
        side = self.token_size * self.unit_tokens
        pos = self.pos_embed.to(x.dtype).view(1, side, side, -1)
        x = x + compact_map(pos, kept, self.unit_tokens)
        inter.update(x0=x)
        return self.run_blocks(x)


class MaskedAutoencoderViT(nn.Module, _MAEDecoder, PretrainModel):
    """MAE ViT with optional secondary masking (MAE random sampling or UM uniform sampling).

    The encoder sees the visible units in raster order (plus cls); ``mask_ratio``
    fixes how many units every mask removes, so no host sync is needed to count them.
    """

    family = "mae"
    mask_kind = "any"  # random sampling (MAE) or uniform sampling (UM)
    build_options = ("mask_ratio",)

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 vis_mask_ratio: float = 0.0, mask_ratio: float = 0.75) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(valid_sizes_message(img_size, lambda s: s % patch_size == 0, patch_size,
                                                 f"ViT (patch {patch_size})"))
        self.stride = patch_size
        self.token_size = img_size // patch_size
        self.stage_dims = [embed_dim]
        self.num_features = embed_dim
        self.norm_pix_loss = norm_pix_loss
        self.vis_mask_ratio = vis_mask_ratio
        self.mask_ratio = mask_ratio
        self.patch_embed = TimmPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.token_size ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, self.token_size, cls_token=True), requires_grad=False)
        if vis_mask_ratio > 0:
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=OuterNorm)
                                     for _ in range(depth)])
        self.norm = OuterNorm(embed_dim)
        self._build_decoder(embed_dim, self.token_size, patch_size, in_chans, decoder_embed_dim, decoder_depth,
                            decoder_num_heads, mlp_ratio, expand=1, cls_token=True)
        assert num_patches == self.pos_embed.shape[1] - 1
        init_reference_weights(self)
        for name in ("cls_token", "mask_token", "vis_mask_token"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def _num_keep(self) -> int:
        n_units = self.token_size ** 2
        return int(n_units * (1 - self.mask_ratio))   # MAE's len_keep

    def forward_encoder(self, imgs: Tensor, mask: Tensor, sm_mask: Optional[Tensor] = None,
                        return_intermediates: bool = False):
        """imgs: (N, 3, H, W); mask: (N, L) True = removed -> latent (N, 1 + n_vis, C), vis_idx (N, n_vis)."""
        mask = mask.bool()
        n, length = mask.shape
        if length != self.token_size ** 2:
            raise ValueError(f"mask must be (N, {self.token_size ** 2}), got {tuple(mask.shape)}")
        num_keep = self._num_keep()
        ok = (mask.sum(1) == length - num_keep).all()
        if mask.device.type == "cpu" and not torch.compiler.is_compiling():  # (a host read breaks a graph)
            if not bool(ok):
                raise ValueError(f"every mask must remove exactly {length - num_keep} of {length} units "
                                 f"(mask_ratio {self.mask_ratio})")
        else:
            torch._assert_async(ok, "mask does not keep int(L * (1 - mask_ratio)) units")
        x = self.patch_embed(imgs)
        pos = self.pos_embed[:, 1:].to(x.dtype)
        x = x + pos
        c = x.shape[-1]
        vis_idx = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_keep]
        gather_idx = vis_idx.unsqueeze(-1).expand(-1, -1, c)
        x = x.gather(1, gather_idx)
        if self.vis_mask_ratio > 0:
            if sm_mask is None:
                sm_mask = secondary_mask(mask, self.vis_mask_ratio)
            sm_vis = sm_mask.bool().gather(1, vis_idx).unsqueeze(-1)
            sm_tok = self.vis_mask_token.to(x.dtype) + pos.expand(n, -1, -1).gather(1, gather_idx)
            x = torch.where(sm_vis, sm_tok, x)
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)
        inter = {"x0": x, "blocks": []}
        for blk in self.blocks:
            x = blk(x)
            inter["blocks"].append(x)
        latent = self.norm(x)
        if return_intermediates:
            return latent, vis_idx, inter
        return latent, vis_idx

    def forward_decoder(self, latent: Tensor, vis_idx: Tensor, return_tokens: bool = False,
                        rows: Optional[Tensor] = None):
        """latent: (N, 1 + n_vis, C) -> pred (N, L, p*p*3) in raster unit order
        (only the units ``rows`` (N, R) when given; the others are 0)."""
        x = self.decoder_embed(latent)
        n, _, d = x.shape
        length = self.token_size ** 2
        full = self.mask_token.to(x.dtype).expand(n, length, d)
        full = full.scatter(1, vis_idx.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        tokens = torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed.to(x.dtype)
        pred = self._decode(tokens, None if rows is None else rows + 1)[:, 1:]
        return (pred, tokens) if return_tokens else pred

    def forward(self, imgs: Tensor, mask: Tensor, sm_mask: Optional[Tensor] = None):
        """Returns (loss, pred (N, L, p*p*3) raster order, mask); in training mode only the removed
        units are predicted (the others are 0)."""
        latent, vis_idx = self.forward_encoder(imgs, mask, sm_mask)
        rows = _masked_rows(mask, self.token_size ** 2 - self._num_keep()) if self.training else None
        pred = self.forward_decoder(latent, vis_idx, rows=rows)
        loss = mae_loss(pred, imgs, mask.bool(), self.stride, self.norm_pix_loss)
        return loss, pred, mask


# ---------------------------------------------------------------- factories

# The encoders' size tables are the backbones' own (models/swin.py, models/pvt.py, models/vit.py).
_FULL = ("tiny", "small", "base", "large")
_PVT_FULL = ("tiny", "small", "medium", "large")
_VIT_FULL = ("base_patch16", "large_patch16", "huge_patch16", "huge_patch14")


def _register(name: str, build, doc: str, classifier: str) -> None:
    register_named(name, build, doc, task="pretrain", namespace=globals(), classifier=classifier)


def _swin_builder(size: str, depth: int, posmlp: int):
    def build(**kwargs):
        cfg = dict(_SWIN_SIZES[size], posmlp_dim=posmlp, decoder_embed_dim=512, decoder_depth=depth,
                   decoder_num_heads=16)
        cfg.update(kwargs)
        return MaskedAutoencoderSwin(**cfg)
    return build


def _pvt_builder(size: str, depth: int):
    def build(**kwargs):
        cfg = dict(_PVT_SIZES[size], decoder_embed_dim=512, decoder_depth=depth, decoder_num_heads=16)
        cfg.update(kwargs)
        return MaskedAutoencoderPVT(**cfg)
    return build


def _vit_builder(size: str, depth: int):
    def build(**kwargs):
        cfg = dict(VIT_SIZES[size], decoder_embed_dim=512, decoder_depth=depth, decoder_num_heads=16)
        cfg.update(kwargs)
        return MaskedAutoencoderViT(**cfg)
    return build


for _size in _FULL:
    # Swin-L: the reference's recommended model has an 8-block decoder and a 64-wide position MLP.
    _default = 8 if _size == "large" else 2
    _pm = 64 if _size == "large" else 32
    _cls = f"swin_{_size}_256"
    _register(f"mae_swin_{_size}_256", _swin_builder(_size, _default, _pm), f"UM-MAE Swin-{_size}, 256 px.", _cls)
    _register(f"mae_swin_{_size}_256_dec512d2b", _swin_builder(_size, 2, 32),
              f"UM-MAE Swin-{_size}, 2-block 512-d decoder.", _cls if _pm == 32 else f"{_cls}_pm32")
    _register(f"mae_swin_{_size}_256_dec512d8b", _swin_builder(_size, 8, _pm),
              f"UM-MAE Swin-{_size}, 8-block 512-d decoder.", _cls)
_register("mae_swin_large_256_dec512d8b64pmd", _swin_builder("large", 8, 64), "The reference's name of Swin-L.",
          "swin_large_256")
for _size in _PVT_FULL:
    _cls = f"pvt_{_size}_256"
    _register(f"mae_pvt_{_size}_256", _pvt_builder(_size, 2), f"UM-MAE PVT-{_size}, 256 px.", _cls)
    _register(f"mae_pvt_{_size}_256_dec512d2b", _pvt_builder(_size, 2), f"UM-MAE PVT-{_size}, 2-block decoder.",
              _cls)
    _register(f"mae_pvt_{_size}_256_dec512d8b", _pvt_builder(_size, 8), f"UM-MAE PVT-{_size}, 8-block decoder.",
              _cls)
for _size in _VIT_FULL:
    _cls = f"vit_{_size}"
    _register(f"mae_vit_{_size}", _vit_builder(_size, 8), f"MAE ViT-{_size} (MAE's standard 8-block decoder).",
              _cls)
    _register(f"mae_vit_{_size}_dec512d2b", _vit_builder(_size, 2), f"MAE ViT-{_size}, 2-block decoder (UM-MAE).",
              _cls)
    _register(f"mae_vit_{_size}_dec512d8b", _vit_builder(_size, 8), f"MAE ViT-{_size}, 8-block decoder.", _cls)


def _tiny(cls, **cfg):
    def build(**kwargs):
        return cls(**{**cfg, **kwargs})
    return build


# tests and demos
_PICO_DECODER = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
_register("mae_swin_pico_128", _tiny(MaskedAutoencoderSwin, **_SWIN_SIZES["pico"], img_size=128, window_size=4,
                                     **_PICO_DECODER),
          "Tiny UM-MAE Swin (128 px, window 4 on the 16x16 compact grid).", "swin_pico_128")
_register("mae_pvt_pico_128", _tiny(MaskedAutoencoderPVT, **_PVT_SIZES["pico"], img_size=128, sr_ratios=(4, 2, 1, 1),
                                    **_PICO_DECODER),
          "Tiny UM-MAE PVT (128 px).", "pvt_pico_128")
_register("mae_vit_pico_patch16", _tiny(MaskedAutoencoderViT, **VIT_SIZES["pico_patch16"], decoder_embed_dim=32,
                                        decoder_depth=1, decoder_num_heads=4),
          "Tiny MAE ViT (96 px, 6x6 units).", "vit_pico_patch16")
_register("mae_swin_pico_p1_32", _tiny(MaskedAutoencoderSwin, **_SWIN_SIZES["pico"], img_size=32, patch_size=1, stride=4,
                                       window_size=4, **_PICO_DECODER),
          "Tiny UM-MAE Swin for 32-px images: patch 1, 4-px mask units (8x8), window 4 on the 16x16 compact grid.",
          "swin_pico_p1_32")
_register("mae_pvt_pico_p1_32", _tiny(MaskedAutoencoderPVT, **_PVT_SIZES["pico"], img_size=32, patch_size=1, stride=4,
                                      sr_ratios=(4, 2, 1, 1), **_PICO_DECODER),
          "Tiny UM-MAE PVT for 32-px images: patch 1, 4-px mask units (8x8).", "pvt_pico_p1_32")
_register("mae_vit_pico_patch4_32", _tiny(MaskedAutoencoderViT, **VIT_SIZES["pico_patch4_32"], **_PICO_DECODER),
          "Tiny MAE ViT for 32-px images (patch 4 = the 4-px mask unit, 8x8 units).", "vit_pico_patch4_32")
