"""ViT classifier for finetuning (timm's VisionTransformer, MAE's global pooling)."""
from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer as _TimmViT
from torch import Tensor

from .registry import register_model

__all__ = ["VisionTransformer"]


class VisionTransformer(_TimmViT):
    """timm ViT with MAE's head: mean of the patch tokens (cls excluded) -> ``fc_norm`` -> ``head``.

    imgs: (N, 3, H, W) -> logits (N, num_classes). ``global_pool=False`` uses the
    cls token after the final ``norm`` instead (MAE's linear-probing layout).
    """

    def __init__(self, global_pool: bool = True, **kwargs) -> None:
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(global_pool="avg" if global_pool else "token", fc_norm=global_pool, **kwargs)

    def forward_pyramid(self, imgs: Tensor) -> list[Tensor]:
        """Four feature maps (N, C, H/p, W/p) from blocks at 1/4, 1/2, 3/4 and full depth."""
        d = len(self.blocks)
        every = self.forward_intermediates(imgs, indices=d, norm=False, intermediates_only=True)
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
