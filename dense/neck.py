"""Adapters and FPN between a dense backbone and a detection head.

As the reference: every used backbone map -> LayerNorm + Linear(C -> 768) ("upK")
-> FPN with 256 channels (torchvision's FeaturePyramidNetwork), lateral and output convs
normalised (BatchNorm, SyncBatchNorm under DDP on CUDA), no activations.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from .backbone import DenseBackbone
from .gfl import GroupNorm


class LinearAdapter(nn.Module):
    """LayerNorm + Linear over channels. x: (N, C, H, W) -> (N, out_dim, H, W)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class ExtraConvsOnOutput(ExtraFPNBlock):
    """mmdet's ``add_extra_convs='on_output'``: P6 = conv3x3/2(P5 output), P7 = conv3x3/2(P6), no ReLU
    between them (mmdet's default; torchvision's LastLevelP6P7 puts one there)."""

    def __init__(self, dim: int, num_extra: int, norm_layer: Optional[Callable[[int], nn.Module]]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, stride=2, padding=1, bias=norm_layer is None),
                          *( [norm_layer(dim)] if norm_layer is not None else []))
            for _ in range(num_extra))

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]):
        for i, conv in enumerate(self.convs):
            results.append(conv(results[-1]))
            names.append(f"p{len(names) + 1}")
        return results, names


def norm_layer_for(kind: str) -> Optional[Callable[[int], nn.Module]]:
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda c: GroupNorm(32 if c % 32 == 0 else 1, c)
    if kind == "none":
        return None
    raise ValueError(f"neck norm {kind!r}: valid choices are bn, gn, none")


class DenseNeck(nn.Module):
    """Backbone + adapters + FPN: images -> OrderedDict of (N, out_channels, H/s, W/s) maps.

    ``start_level``: the first backbone map used (1 = stride 8 for Swin / PVT, as the reference's
    GFL); ``extra``: "convs" (P6, P7 by stride-2 convs on the FPN output, 5 levels in all for
    start level 1) or "maxpool" (torchvision's P6 = max-pool of P5, Mask R-CNN's setting).
    ``out_channels`` and ``strides`` describe the outputs; keys are "0", "1", ... then "p6", ...
    (torchvision's MultiScaleRoIAlign reads the numbered ones).
    """

    def __init__(self, backbone: DenseBackbone, adapter_dim: int = 768, out_channels: int = 256,
                 start_level: int = 1, num_outs: int = 5, extra: str = "convs", norm: str = "bn") -> None:
        super().__init__()
        self.backbone = backbone
        self.start_level = start_level
        used = list(range(start_level, len(backbone.out_channels)))
        backbone.use_levels(used)
        self.adapters = nn.ModuleList(LinearAdapter(backbone.out_channels[i], adapter_dim) for i in used)
        norm_layer = norm_layer_for(norm)
        num_extra = num_outs - len(used)
        if extra == "convs":
            extra_block = ExtraConvsOnOutput(out_channels, num_extra, norm_layer) if num_extra > 0 else None
        elif extra == "maxpool":
            if num_extra != 1:
                raise ValueError("extra='maxpool' adds exactly one level")
            extra_block = LastLevelMaxPool()
        else:
            raise ValueError(f"extra {extra!r}: valid choices are convs, maxpool")
        self.fpn = FeaturePyramidNetwork([adapter_dim] * len(used), out_channels, extra_blocks=extra_block,
                                         norm_layer=norm_layer)
        self.out_channels = out_channels
        base = [backbone.strides[i] for i in used]
        self.strides = base + [base[-1] * 2 ** (k + 1) for k in range(num_extra)]

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.backbone(images)[self.start_level:]
        x = OrderedDict((str(i), a(f)) for i, (a, f) in enumerate(zip(self.adapters, feats)))
        return self.fpn(x)
