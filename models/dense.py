"""A classifier as a backbone for dense prediction (detection, segmentation): ``DenseBackbone``.

It wraps the classifier's ``forward_pyramid``; channels, strides and the padding divisor are
the classifier's contract (``contract.pyramid``, ``contract.pyramid_divisor``), never its name:

    backbone = DenseBackbone(classifier)      # util.pretrained.build_backbone also loads weights
    feats = backbone(images)                  # images (N, 3, H, W), any H, W
    backbone.out_channels                     # [96, 192, 384, 768]
    backbone.strides                          # [4, 8, 16, 32]; feats[i]: (N, C_i, ceil(H/32)*32/s_i, ...)

A single-scale model (a plain ViT: every map at the patch stride) gets ViTDet's simple feature
pyramid over its last map: strides p/4, p/2, p and 2p.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from timm.layers import LayerNorm2d
from torch import Tensor, nn

from .layers import pad_to_multiple
from .registry import describe, list_models

__all__ = ["DenseBackbone", "SimpleFeaturePyramid", "dense_models", "has_pyramid"]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-p map -> strides p/4, p/2, p, 2p.

    x: (N, C, h, w) -> [(N, C/4, 4h, 4w), (N, C/2, 2h, 2w), (N, C, h, w), (N, C, h/2, w/2)]
    (deconvolutions up, max-pooling down; the per-scale projections are the neck's job).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
        self.down2 = nn.MaxPool2d(2)
        self.out_channels = [dim // 4, dim // 2, dim, dim]

    def keep(self, levels: Sequence[int]) -> None:
        """Drop the branches of levels no one reads."""
        if 0 not in levels:
            self.up4 = None
        if 1 not in levels:
            self.up2 = None

    def forward(self, x: Tensor) -> list[Optional[Tensor]]:
        up = lambda m: m(x) if m is not None else None
        return [up(self.up4), up(self.up2), x, self.down2(x)]


def has_pyramid(model: nn.Module) -> bool:
    """Whether a model's contract has a feature pyramid (``forward_pyramid``)."""
    contract = getattr(model, "contract", None)
    return getattr(contract, "pyramid", None) is not None


class DenseBackbone(nn.Module):
    """A classifier's ``forward_pyramid`` as a detection / segmentation backbone.

    images: (N, 3, H, W), any H, W -> list of (N, out_channels[i], H_i, W_i) with
    H_i = ceil(H / size_divisor) * size_divisor / strides[i]. ``body`` is the classifier
    (its parameter names are the checkpoint's), ``sfp`` the simple feature pyramid of a
    single-scale model (else None).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not has_pyramid(model):
            raise ValueError(f"{type(model).__name__} has no feature pyramid (forward_pyramid with "
                             f"pyramid_channels / pyramid_strides / pyramid_divisor); dense backbones are "
                             f"listed by models.dense.dense_models()")
        self.body = model
        contract = model.contract
        channels, strides = (list(x) for x in contract.pyramid)
        self.sfp: Optional[SimpleFeaturePyramid] = None
        if len(set(strides)) == 1:  # single-scale (plain ViT): build the pyramid from the last map
            p = strides[-1]
            if p % 4:
                raise ValueError(f"a simple feature pyramid needs a patch stride divisible by 4, got {p}")
            self.sfp = SimpleFeaturePyramid(channels[-1])
            channels, strides = self.sfp.out_channels, [p // 4, p // 2, p, 2 * p]
        self.out_channels: list[int] = channels
        self.strides: list[int] = strides
        # inputs padded to this give every map an exact integer size (the 2x pooling of a ViT included)
        self.size_divisor: int = math.lcm(int(contract.pyramid_divisor), max(strides))
        self.levels: tuple[int, ...] = tuple(range(len(strides)))

    def use_levels(self, levels: Sequence[int]) -> None:
        """Compute only these maps (the others come back as None): a neck that skips stride 4
        leaves no unused parameters in the simple feature pyramid (DDP needs none)."""
        self.levels = tuple(sorted(levels))
        if self.sfp is not None:
            self.sfp.keep(self.levels)

    def forward(self, images: Tensor) -> list[Optional[Tensor]]:
        feats = self.body.forward_pyramid(pad_to_multiple(images, self.size_divisor))
        if self.sfp is not None:
            feats = self.sfp(feats[-1])
        return [f if i in self.levels else None for i, f in enumerate(feats)]


def dense_models() -> list[str]:
    """Registered classifiers that can serve as dense backbones (their contracts have a pyramid)."""
    return [name for name in list_models(task="classify") if describe(name, num_classes=0).pyramid is not None]
