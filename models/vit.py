"""ViT classifier for finetuning (timm's VisionTransformer, MAE's global pooling)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as _TimmViT
from torch import Tensor

from .contract import Classifier
from .layers import pad_to_multiple
from .registry import register_model

__all__ = ["VisionTransformer"]


class VisionTransformer(_TimmViT, Classifier):
    """timm ViT with MAE's head: mean of the patch tokens (cls excluded) -> ``fc_norm`` -> ``head``.

    imgs: (N, 3, H, W) -> logits (N, num_classes). ``global_pool=False`` uses the
    cls token after the final ``norm`` instead (MAE's linear-probing layout).
    """

    family = "vit"
    build_options = ("global_pool",)   # MAE's --global_pool / --cls_token choice

    def __init__(self, global_pool: bool = True, **kwargs) -> None:
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(global_pool="avg" if global_pool else "token", fc_norm=global_pool, **kwargs)

    def native_size(self) -> int:
        return int(self.patch_embed.img_size[0])

    @property
    def pyramid_channels(self) -> list[int]:
        """Channels of the ``forward_pyramid`` maps."""
        return [self.embed_dim] * 4

    @property
    def pyramid_strides(self) -> list[int]:
        """Strides of the ``forward_pyramid`` maps: all the patch size (a plain, single-scale ViT)."""
        return [self.patch_embed.patch_size[0]] * 4

    @property
    def pyramid_divisor(self) -> int:
        """``forward_pyramid`` pads its input to a multiple of this (the patch size)."""
        return self.patch_embed.patch_size[0]

    def forward_pyramid(self, imgs: Tensor) -> list[Tensor]:
        """Four feature maps (N, C, ceil(H/p), ceil(W/p)) from blocks at 1/4, 1/2, 3/4 and full depth.

        Any H, W: the input is zero-padded to patch multiples and the position embedding is
        resized (bicubic) to the patch grid; at the built size it is used as it is.
        """
        x = self.patch_embed.proj(pad_to_multiple(imgs, self.pyramid_divisor))
        n, c, h, w = x.shape
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        prefix = [t.expand(n, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pos = resample_abs_pos_embed(self.pos_embed, [h, w], num_prefix_tokens=0 if self.no_embed_class
                                     else self.num_prefix_tokens)
        if self.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        x = self.norm_pre(self.pos_drop(x))
        d = len(self.blocks)
        take = {max(i, 0) for i in (d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1, d - 1)}
        every = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                every[i] = x[:, self.num_prefix_tokens:].transpose(1, 2).reshape(n, c, h, w)
        return [every[max(i, 0)] for i in (d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1, d - 1)]


def _vit(embed_dim: int, depth: int, num_heads: int, patch_size: int, **kwargs) -> VisionTransformer:
    kwargs.setdefault("img_size", 224)
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=4.0, qkv_bias=True, **kwargs)


@register_model
def vit_base_patch16(**kwargs) -> VisionTransformer:
    return _vit(768, 12, 12, 16, **kwargs)


@register_model
def vit_large_patch16(**kwargs) -> VisionTransformer:
    return _vit(1024, 24, 16, 16, **kwargs)


@register_model
def vit_huge_patch16(**kwargs) -> VisionTransformer:
    return _vit(1280, 32, 16, 16, **kwargs)


@register_model
def vit_huge_patch14(**kwargs) -> VisionTransformer:
    """MAE's released ViT-H is patch 14."""
    return _vit(1280, 32, 16, 14, **kwargs)


@register_model
def vit_pico_patch16(**kwargs) -> VisionTransformer:
    """Tiny test/demo classifier (64-d, 2 blocks) at 96 px: finetunes ``mae_vit_pico_patch16``."""
    kwargs.setdefault("img_size", 96)
    return _vit(64, 2, 4, 16, **kwargs)


@register_model
def vit_pico_patch4_32(**kwargs) -> VisionTransformer:
    """Tiny ViT for 32-px images (64-d, 4 blocks, patch 4 = 8x8 tokens): finetunes ``mae_vit_pico_patch4_32``."""
    kwargs.setdefault("img_size", 32)
    return _vit(64, 4, 4, 4, **kwargs)
