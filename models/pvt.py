"""PVT (v1 style) as the UM-MAE reference has it, and its classifier.

Differences from the official PVT, kept for checkpoint compatibility:
  * one absolute position embedding, at stage 1 only (fixed sin-cos when
    pretraining, learnable when finetuning);
  * spatial reduction = average pool (sr_ratio) -> 1x1 conv -> LayerNorm; the
    conv and norm exist at sr 1 too, so the sr ratios can change between
    pretraining (4,2,1,1 on the compact grid) and finetuning (8,4,2,1) without
    touching the parameters;
  * stage transitions are a 2x2 stride-2 conv (no norm) owned by the first block
    of stages 2-4, in one flat ``blocks`` list.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from .contract import Classifier
from .layers import (BlockNorm, OuterNorm, PatchEmbed, PatchMerge, StagePyramid, drop_path_rates,
                     init_reference_weights, pad_to_multiple, valid_sizes_message)
from .pos_embed import sincos_2d
from .registry import Variant, register

__all__ = ["PVTEncoder", "PVT", "pvt_grid_ok"]


def pvt_grid_ok(grid: int, sr_ratios: Sequence[int]) -> bool:
    """Whether a square first-stage token grid divides through every stage and reduction."""
    for s, sr in enumerate(sr_ratios):
        if grid % (1 << s):
            return False
        g = grid >> s
        if g % sr:
            return False
    return True


class PVTAttention(nn.Module):
    """Attention whose keys/values come from a spatially reduced map."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio  # not a parameter: may differ between pretraining and finetuning
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm = BlockNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)"""
        b, h, w, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        q = self.q(x).view(b, h * w, heads, hd).transpose(1, 2)
        r = x
        if self.sr_ratio > 1:  # pools the channel-last map in place (a channels_last NCHW view)
            r = F.avg_pool2d(r.permute(0, 3, 1, 2), self.sr_ratio).permute(0, 2, 3, 1)
        # the 1x1 conv applied as a linear map on channel-last tokens: no layout copies
        r = F.linear(r.reshape(b, -1, c), self.sr.weight.flatten(1), self.sr.bias)
        r = self.norm(r)
        k, v = self.kv(r).view(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class PVTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float = 0.0,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.downsample = downsample
        self.norm1 = BlockNorm(dim)
        self.attn = PVTAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = BlockNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PVTEncoder(nn.Module):
    """Patch embedding, the stage-1 position embedding and the flat block list."""

    def __init__(self, img_size: int = 256, patch_size: int = 4, in_chans: int = 3,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), drop_path_rate: float = 0.0,
                 pos_grid: int | None = None, learnable_pos: bool = True) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.depths = tuple(depths)
        self.stage_dims = list(embed_dims)
        self.sr_ratios = tuple(sr_ratios)
        self.num_features = embed_dims[-1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dims[0], norm=False)
        grid = pos_grid if pos_grid is not None else img_size // patch_size
        self.pos_embed = nn.Parameter(sincos_2d(embed_dims[0], grid), requires_grad=learnable_pos)
        dpr = drop_path_rates(depths, drop_path_rate)
        blocks = []
        for s, depth in enumerate(depths):
            for i in range(depth):
                down = PatchMerge(embed_dims[s - 1], embed_dims[s], norm=False) if s > 0 and i == 0 else None
                blocks.append(PVTBlock(embed_dims[s], num_heads[s], mlp_ratios[s], sr_ratios[s],
                                       drop_path=dpr[len(blocks)], downsample=down))
        self.blocks = nn.ModuleList(blocks)

    def run_blocks(self, x: Tensor) -> list[Tensor]:
        """x: (B, H, W, C) first-stage tokens (position embedding added) -> each stage's last output."""
        outs = []
        for blk in self.blocks:
            if blk.downsample is not None:
                outs.append(x)
                x = blk.downsample(x)
            x = blk(x)
        outs.append(x)
        return outs

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


class PVT(StagePyramid, PVTEncoder, Classifier):
    """PVT classifier for finetuning: global average pool -> ``fc_norm`` -> ``head``.

    imgs: (N, 3, H, W) -> logits (N, num_classes).
    """

    family = "pvt"

    def __init__(self, img_size: int = 256, num_classes: int = 1000, global_pool: bool = True,
                 **kwargs) -> None:
        if not global_pool:  # the reference's constructors take the flag; average pooling is the only head
            raise ValueError("PVT classifiers pool by averaging the last stage's tokens (global_pool=True)")
        super().__init__(img_size=img_size, learnable_pos=True, **kwargs)
        grid_ok = lambda s: s % self.patch_size == 0 and pvt_grid_ok(s // self.patch_size, self.sr_ratios)
        if not grid_ok(img_size):
            raise ValueError(valid_sizes_message(img_size, grid_ok, self.patch_size * 8,
                                                 f"PVT (patch {self.patch_size}, sr {list(self.sr_ratios)})"))
        self.num_classes = num_classes
        self.fc_norm = OuterNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_reference_weights(self)

    def _embed(self, imgs: Tensor) -> Tensor:
        x = self.patch_embed(imgs)
        b, h, w, c = x.shape
        if h * w != self.pos_embed.shape[1]:
            raise ValueError(f"PVT built for {self.img_size}-px inputs got {imgs.shape[-2]}x{imgs.shape[-1]}")
        return x + self.pos_embed.view(1, h, w, c)

    @property
    def pyramid_divisor(self) -> int:
        """``forward_pyramid`` pads its input to a multiple of this: every stage's map divides
        by its spatial reduction."""
        return math.lcm(*(self.patch_size * 2 ** s * sr for s, sr in enumerate(self.sr_ratios)))

    def forward_pyramid(self, imgs: Tensor) -> list[Tensor]:
        """The four stage feature maps for dense prediction: [(N, C_s, ceil(H/32)*8/2**s, ...)].

        Any H, W: the input is zero-padded right / bottom to ``pyramid_divisor``, and the
        stage-1 position embedding is resized (bicubic) to the token grid on every call, as
        the reference's PVTDet does; at the built size it is used as it is.
        """
        x = self.patch_embed(pad_to_multiple(imgs, self.pyramid_divisor))
        b, h, w, c = x.shape
        pos = self.pos_embed
        g = math.isqrt(pos.shape[1])
        if (h, w) == (g, g):
            pos = pos.view(1, h, w, c)
        else:
            pos = F.interpolate(pos.reshape(1, g, g, c).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        return [o.permute(0, 3, 1, 2).contiguous() for o in self.run_blocks(x + pos)]

    def forward_features(self, imgs: Tensor) -> Tensor:
        return self.run_blocks(self._embed(imgs))[-1].flatten(1, 2)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.fc_norm(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(imgs))


PVT_SIZES = {
    "tiny": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), num_heads=(1, 2, 5, 8)),
    "small": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8)),
    "medium": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), num_heads=(1, 2, 5, 8)),
    "large": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3), num_heads=(1, 2, 5, 8)),
    "pico": dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4)),
}
_CLASSIFIER = dict(mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))  # the reference's PVT classifiers

VARIANTS = {
    "pvt_tiny_256": Variant(dict(PVT_SIZES["tiny"], **_CLASSIFIER, img_size=256),
                            "PVT-tiny classifier, 256 px, sr 8,4,2,1."),
    "pvt_small_256": Variant(dict(PVT_SIZES["small"], **_CLASSIFIER, img_size=256),
                             "PVT-small classifier, 256 px, sr 8,4,2,1."),
    "pvt_medium_256": Variant(dict(PVT_SIZES["medium"], **_CLASSIFIER, img_size=256),
                              "PVT-medium classifier, 256 px, sr 8,4,2,1."),
    "pvt_large_256": Variant(dict(PVT_SIZES["large"], **_CLASSIFIER, img_size=256),
                             "PVT-large classifier, 256 px, sr 8,4,2,1."),
    "pvt_pico_128": Variant(dict(PVT_SIZES["pico"], **_CLASSIFIER, img_size=128),
                            "Tiny test/demo classifier: finetunes mae_pvt_pico_128."),
    "pvt_pico_p1_32": Variant(dict(PVT_SIZES["pico"], **_CLASSIFIER, img_size=32, patch_size=1),
                              "Tiny classifier for 32-px images (patch 1, sr 8,4,2,1 on the 32x32 token grid); "
                              "finetunes mae_pvt_pico_p1_32 / simmim_pvt_pico_p1_32."),
}
register(PVT, VARIANTS)
