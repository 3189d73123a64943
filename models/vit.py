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
from .registry import Variant, register

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
    def prefix_tokens(self) -> int:
        """Tokens before the patches in ``pos_embed`` (the cls token)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

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


# The ViT sizes, shared with the MAE autoencoders (models/mae.py): name -> encoder configuration.
VIT_SIZES = {
    "base_patch16": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, img_size=224),
    "large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16, img_size=224),
    "huge_patch16": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=16, img_size=224),
    "huge_patch14": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14, img_size=224),  # MAE's released ViT-H
    # tests and demos: 64-d, 2 blocks at 96 px; 4 blocks with patch 4 (8x8 tokens) at 32 px
    "pico_patch16": dict(embed_dim=64, depth=2, num_heads=4, patch_size=16, img_size=96),
    "pico_patch4_32": dict(embed_dim=64, depth=4, num_heads=4, patch_size=4, img_size=32),
}


_CLASSIFIER = dict(mlp_ratio=4.0, qkv_bias=True)

VARIANTS = {
    "vit_base_patch16": Variant(dict(VIT_SIZES["base_patch16"], **_CLASSIFIER),
                                "ViT base_patch16 at 224 px (MAE finetuning)."),
    "vit_large_patch16": Variant(dict(VIT_SIZES["large_patch16"], **_CLASSIFIER),
                                 "ViT large_patch16 at 224 px (MAE finetuning)."),
    "vit_huge_patch16": Variant(dict(VIT_SIZES["huge_patch16"], **_CLASSIFIER),
                                "ViT huge_patch16 at 224 px (MAE finetuning)."),
    "vit_huge_patch14": Variant(dict(VIT_SIZES["huge_patch14"], **_CLASSIFIER),
                                "ViT huge_patch14 at 224 px (MAE finetuning)."),
    "vit_pico_patch16": Variant(dict(VIT_SIZES["pico_patch16"], **_CLASSIFIER),
                                "ViT pico_patch16 at 96 px (MAE finetuning)."),
    "vit_pico_patch4_32": Variant(dict(VIT_SIZES["pico_patch4_32"], **_CLASSIFIER),
                                  "ViT pico_patch4_32 at 32 px (MAE finetuning)."),
}
register(VisionTransformer, VARIANTS)
