"""SimMIM baselines on the reference Swin and PVT encoders (as UM-MAE compares them).

The encoder runs on the *whole* image, at the finetuning geometry (Swin window 16
at 256 px, PVT spatial reduction 8,4,2,1), so it costs as much as finetuning:
  1. random masks of 16-px units (75% by default; ``models.masking.random_mask``);
  2. after patch embedding (for Swin: after its LayerNorm), every 4-px token of a
     masked unit is replaced by a learned ``mask_token`` (1, 1, C1); PVT then adds
     its fixed sin-cos position embedding, to mask tokens too;
  3. the encoder's 1/32-resolution output goes through the final ``norm``, then
     ``decoder_pred`` = Linear(C_last, 4 * 16*16*3) and a 2x pixel shuffle give one
     16x16x3 prediction per unit;
  4. L1 loss on the masked units only (``models.loss.simmim_loss``).

Checkpoints. The encoder keys (``patch_embed.*``, ``blocks.*``, PVT's
``pos_embed``) are exactly those of the classifiers ``swin_*_256`` / ``pvt_*_256``,
so ``checkpoint['model']`` finetunes with only ``fc_norm.*`` / ``head.*`` missing;
``mask_token``, ``norm.*`` and ``decoder_pred.*`` are the pretraining-only keys.

``norm_pix_loss=True`` (not what the UM-MAE baselines ran) makes the L1 target of
each unit its pixels normalised by the unit's own mean and std, as in MAE.

All predictions are in raster unit order: ``pred[:, u]`` is unit u, so figures
and losses treat SimMIM and UM-MAE models alike.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import PretrainModel, PretrainOutput
from .layers import check_images_and_mask, OuterNorm, init_reference_weights, valid_sizes_message
from .loss import patchify, simmim_loss, unit_stats, unpatchify
from .pvt import PVT_SIZES, PVTEncoder, pvt_grid_ok
from .registry import Variant, register
from .swin import SWIN_SIZES, Positions, SwinEncoder, swin_grid_ok

__all__ = ["SimMIMSwin", "SimMIMPVT", "unit_mask_to_tokens"]


def unit_mask_to_tokens(mask: Tensor, token_size: int, unit_tokens: int) -> Tensor:
    """Expand a unit mask to the patch-token grid.

    mask: (N, T*T) bool in raster unit order; each unit covers ``unit_tokens`` x
    ``unit_tokens`` patch tokens. Returns (N, T*k, T*k, 1) bool, channel-last.
    """
    n, t, k = mask.shape[0], token_size, unit_tokens
    m = mask.view(n, t, 1, t, 1).expand(n, t, k, t, k)
    return m.reshape(n, t * k, t * k, 1)


class _SimMIM(PretrainModel):
    """SimMIM logic shared by the Swin and PVT models (mixin).

    Subclasses provide ``_encode(x) -> stage outputs`` for first-stage tokens
    ``x`` (N, H/4, W/4, C1) in which the mask token is already in place.
    """

    family = "simmim"
    raw_pixel_recipe = True            # the reference trained the SimMIM baselines on raw pixels
    mask_kind = "random"               # no compaction: any mask works, the baseline uses random ones
    default_mask_ratio = 0.75
    supports_secondary_mask = False    # every token is in the encoder; there is nothing to mask twice
    pretrain_only = PretrainModel.pretrain_only + ("simmim_head",)  # (the name of SimMIM's head elsewhere)
    vis_mask_ratio = 0.0

    def _setup(self, img_size: int, patch_size: int, stride: int, in_chans: int, num_stages: int,
               norm_pix_loss: bool) -> None:
        self.stride = stride
        self.token_size = img_size // stride
        self.unit_tokens = stride // patch_size
        self.norm_pix_loss = bool(norm_pix_loss)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.stage_dims[0]))
        self.norm = OuterNorm(self.num_features)
        # The last stage has one token per 2x2 block of units; the pixel shuffle spreads it over the four.
        self.shuffle = patch_size * 2 ** (num_stages - 1) // stride
        self.decoder_pred = nn.Linear(self.num_features, self.shuffle ** 2 * stride * stride * in_chans)
        init_reference_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def _check_inputs(self, imgs: Tensor, mask: Tensor) -> None:
        check_images_and_mask(self, imgs, mask)

    def forward_encoder(self, imgs: Tensor, mask: Tensor, return_intermediates: bool = False):
        """imgs: (N, 3, H, W); mask: (N, T*T) bool, True = masked.

        Returns latent (N, H/32, W/32, C_last) after the final norm (and a dict of intermediates).
        """
        mask = mask.bool()
        self._check_inputs(imgs, mask)
        x = self.patch_embed(imgs)                                            # (N, H/4, W/4, C1)
        masked = unit_mask_to_tokens(mask, self.token_size, self.unit_tokens)  # (N, H/4, W/4, 1)
        x = torch.where(masked, self.mask_token.to(x.dtype), x)
        outs = self._encode(x)
        latent = self.norm(outs[-1])
        if return_intermediates:
            return latent, {"x0": x, "stages": outs}
        return latent

    def forward_head(self, latent: Tensor) -> Tensor:
        """latent: (N, h, w, C_last) -> pred (N, T*T, stride*stride*3), raster unit order, T = 2h."""
        y = self.decoder_pred(latent).permute(0, 3, 1, 2)                    # (N, r*r*D, h, w)
        y = F.pixel_shuffle(y, self.shuffle)                                 # (N, D, T, T)
        return y.flatten(2).transpose(1, 2)                                  # (N, T*T, D)

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """L1 over the masked units only. imgs (N, 3, H, W), pred (N, L, D), mask (N, L)."""
        if self.norm_pix_loss:
            # One loss implementation for both targets: normalise each unit, then rebuild the image.
            target = patchify(imgs, self.stride)
            mean, std = unit_stats(target)
            imgs = unpatchify((target - mean) / std, self.stride, imgs.shape[1])
        return simmim_loss(pred, imgs, mask, self.stride)

    def forward(self, imgs: Tensor, mask: Tensor, sm_mask: Optional[Tensor] = None):
        """imgs: (N, 3, H, W); mask: (N, L) bool, True = masked; sm_mask must be None.

        Returns (loss, pred (N, L, stride*stride*3) in raster unit order, mask).
        """
        if sm_mask is not None:
            raise ValueError(f"{type(self).__name__} has no secondary masking: sm_mask must be None")
        latent = self.forward_encoder(imgs, mask)
        pred = self.forward_head(latent)
        loss = self.forward_loss(imgs, pred, mask.bool())
        return PretrainOutput(loss, pred, mask)


def _check_common(img_size: int, patch_size: int, stride: int, num_stages: int, vis_mask_ratio: float,
                  grid_ok, what: str) -> None:
    if vis_mask_ratio > 0:
        raise ValueError(f"{what} has no secondary masking (its encoder already sees every token, as a "
                         f"mask token or as pixels): vis_mask_ratio must be 0, got {vis_mask_ratio}")
    if stride % patch_size or 2 * stride != patch_size * 2 ** (num_stages - 1):
        raise ValueError(f"{what}: the last stage must have one token per 2x2 mask units "
                         f"(stride {stride}, patch {patch_size}, {num_stages} stages)")
    step = 2 * stride

    def ok(s: int) -> bool:
        return s % step == 0 and grid_ok(s // patch_size)
    if not ok(img_size):
        raise ValueError(valid_sizes_message(img_size, ok, step, what))


class SimMIMSwin(_SimMIM, SwinEncoder):
    """SimMIM with the reference Swin encoder at full resolution (window 16 at 256 px)."""

    def __init__(self, img_size: int = 256, patch_size: int = 4, in_chans: int = 3, stride: int = 16,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 16, mlp_ratio: float = 4.0, posmlp_dim: int = 32, drop_path_rate: float = 0.0,
                 norm_pix_loss: bool = False, vis_mask_ratio: float = 0.0) -> None:
        _check_common(img_size, patch_size, stride, len(depths), vis_mask_ratio,
                      lambda g: swin_grid_ok(g, window_size, len(depths)),
                      f"SimMIM Swin (patch {patch_size}, window {window_size})")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depths=depths, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
                         posmlp_dim=posmlp_dim, drop_path_rate=drop_path_rate)
        self._setup(img_size, patch_size, stride, in_chans, len(depths), norm_pix_loss)

    def _encode(self, x: Tensor) -> list[Tensor]:
        # One position grid shared by the batch, as in finetuning (the bias broadcasts over samples).
        return self.run_blocks(x, Positions.grid(x.shape[1], x.shape[2], x.device))


class SimMIMPVT(_SimMIM, PVTEncoder):
    """SimMIM with the reference PVT encoder at full resolution (sr 8,4,2,1; fixed sin-cos position)."""

    def __init__(self, img_size: int = 256, patch_size: int = 4, in_chans: int = 3, stride: int = 16,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), drop_path_rate: float = 0.0,
                 norm_pix_loss: bool = False, vis_mask_ratio: float = 0.0) -> None:
        _check_common(img_size, patch_size, stride, len(depths), vis_mask_ratio,
                      lambda g: pvt_grid_ok(g, sr_ratios), f"SimMIM PVT (patch {patch_size}, sr {list(sr_ratios)})")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dims=embed_dims,
                         depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios, sr_ratios=sr_ratios,
                         drop_path_rate=drop_path_rate, learnable_pos=False)
        self._setup(img_size, patch_size, stride, in_chans, len(depths), norm_pix_loss)

    def _encode(self, x: Tensor) -> list[Tensor]:
        n, h, w, c = x.shape
        return self.run_blocks(x + self.pos_embed.to(x.dtype).view(1, h, w, c))


# ---------------------------------------------------------------- factories
# The encoder configurations come from the classifiers' own tables, so the keys and
# shapes of a SimMIM encoder are those of the model it finetunes into.
_PVT = dict(mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))

SWIN_VARIANTS = {
    "simmim_swin_tiny_256": Variant(dict(SWIN_SIZES["tiny"], img_size=256, window_size=16),
                                    "SimMIM Swin-tiny, 256 px, window 16.", classifier="swin_tiny_256"),
    "simmim_swin_small_256": Variant(dict(SWIN_SIZES["small"], img_size=256, window_size=16),
                                     "SimMIM Swin-small, 256 px, window 16.", classifier="swin_small_256"),
    "simmim_swin_base_256": Variant(dict(SWIN_SIZES["base"], img_size=256, window_size=16),
                                    "SimMIM Swin-base, 256 px, window 16.", classifier="swin_base_256"),
    "simmim_swin_large_256": Variant(dict(SWIN_SIZES["large"], img_size=256, window_size=16),
                                     "SimMIM Swin-large, 256 px, window 16.", classifier="swin_large_256"),
    "simmim_swin_pico_128": Variant(dict(SWIN_SIZES["pico"], img_size=128, window_size=8),
                                    "Tiny SimMIM Swin for tests and demos (128 px, window "
                                    "8).", classifier="swin_pico_128"),
    "simmim_swin_pico_p1_32": Variant(dict(SWIN_SIZES["pico"], img_size=32, window_size=8, patch_size=1, stride=4),
                                      "Tiny SimMIM Swin for 32-px images: patch 1, 4-px "
                                      "mask units.", classifier="swin_pico_p1_32"),
}
PVT_VARIANTS = {
    "simmim_pvt_tiny_256": Variant(dict(PVT_SIZES["tiny"], **_PVT, img_size=256),
                                   "SimMIM PVT-tiny, 256 px, sr 8,4,2,1.", classifier="pvt_tiny_256"),
    "simmim_pvt_small_256": Variant(dict(PVT_SIZES["small"], **_PVT, img_size=256),
                                    "SimMIM PVT-small, 256 px, sr 8,4,2,1.", classifier="pvt_small_256"),
    "simmim_pvt_medium_256": Variant(dict(PVT_SIZES["medium"], **_PVT, img_size=256),
                                     "SimMIM PVT-medium, 256 px, sr 8,4,2,1.", classifier="pvt_medium_256"),
    "simmim_pvt_large_256": Variant(dict(PVT_SIZES["large"], **_PVT, img_size=256),
                                    "SimMIM PVT-large, 256 px, sr 8,4,2,1.", classifier="pvt_large_256"),
    "simmim_pvt_pico_128": Variant(dict(PVT_SIZES["pico"], **_PVT, img_size=128),
                                   "Tiny SimMIM PVT for tests and demos (128 px).", classifier="pvt_pico_128"),
    "simmim_pvt_pico_p1_32": Variant(dict(PVT_SIZES["pico"], **_PVT, img_size=32, patch_size=1, stride=4),
                                     "Tiny SimMIM PVT for 32-px images: patch 1, 4-px "
                                     "mask units.", classifier="pvt_pico_p1_32"),
}
register(SimMIMSwin, SWIN_VARIANTS)
register(SimMIMPVT, PVT_VARIANTS)
