"""UperNet + FCN auxiliary head on a feature pyramid: the reference's SEG model.

    backbone stages (N, C_s, H/4/2**s, W/4/2**s), s = 0..3
      -> adapters: Conv1x1(C_s -> 768) per stage
      -> UperNet (PPM pool scales 1, 2, 3, 6 on the last stage; FPN 768; fused 3x3 conv; dropout 0.1)
      -> logits (N, K, H/4, W/4), upsampled bilinearly to the labels
      + FCN auxiliary head on the third adapter output (one 3x3 conv, 256 channels, dropout 0.1), loss x0.4

Convolutions are conv (no bias) + BatchNorm + ReLU, as mmcv's ConvModule with a norm; under DDP
on CUDA the programs convert the BatchNorms to SyncBatchNorm. The loss is cross-entropy with
``ignore_index`` 255, averaged over all pixels of the batch, ignored ones included, as in
mmseg 0.11 (``avg_non_ignore=True`` divides by the labelled pixels only, mmseg >= 0.23's option).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))
        # mmcv ConvModule's initialisation: Kaiming normal (fan_out, ReLU) convs, unit norms
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


def _up(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Classifier(nn.Sequential):
    """Dropout2d + 1x1 conv to the classes (mmseg's ``cls_seg``), weights N(0, 0.01)."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), nn.Conv2d(channels, num_classes, 1))
        nn.init.normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


class UperHead(nn.Module):
    """Pyramid pooling on the coarsest map + a top-down FPN; all levels fused at stride 4.

    feats: 4 maps (N, C_i, H_i, W_i), finest first -> logits (N, num_classes, H_0, W_0)."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels[-1], channels))
                                 for s in self.pool_scales)
        self.ppm_bottleneck = ConvBNReLU(in_channels[-1] + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.cls = Classifier(channels, num_classes, dropout)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        top = feats[-1]
        pooled = [_up(branch(top), top.shape[2:]) for branch in self.ppm]
        levels = [conv(f) for conv, f in zip(self.lateral, feats[:-1])]
        levels.append(self.ppm_bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down pathway
            levels[i - 1] = levels[i - 1] + _up(levels[i], levels[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[2:]
        fused = self.fuse(torch.cat([outs[0]] + [_up(o, size) for o in outs[1:]], dim=1))
        return self.cls(fused)


class FCNHead(nn.Module):
    """``num_convs`` 3x3 ConvBNReLU then the classifier (mmseg FCNHead, concat_input=False)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[ConvBNReLU(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)])
        self.cls = Classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.convs(x))


def seg_cross_entropy(logits: Tensor, labels: Tensor, avg_non_ignore: bool = False) -> Tensor:
    """logits (N, K, h, w) are upsampled to labels (N, H, W) before the loss (mmseg), in float32
    (under bf16 autocast the head's logits are bf16: interpolating them there would round again)."""
    logits = _up(logits.float(), labels.shape[-2:])
    loss = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    if avg_non_ignore:
        return loss / (labels != IGNORE_INDEX).sum().clamp(min=1)
    return loss / labels.numel()


class SegmentationModel(nn.Module):
    """Backbone + Conv1x1 adapters + UperNet (+ FCN auxiliary head).

    ``backbone`` is a ``dense.backbone.DenseBackbone``: ``backbone(imgs)`` returns four maps, finest
    first, computed on the input padded right / bottom; ``out_channels`` and ``strides`` describe
    them. Each map is cut back to the image (ceil(H / stride) x ceil(W / stride)), so the heads
    see the image's own extent and the logits align with it. ``forward(imgs)`` -> logits (N, K, H, W) at the input
    size; ``forward(imgs, labels)`` -> (total loss, {"loss_decode", "loss_aux"}) so that the
    training step runs through one (DDP-wrapped) forward.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, adapter_dim: int = 768, channels: int = 768,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, aux_channels: int = 256,
                 aux_index: int = 2, aux_weight: float = 0.4, avg_non_ignore: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.adapters = nn.ModuleList(nn.Conv2d(c, adapter_dim, 1) for c in backbone.out_channels)
        n = len(backbone.out_channels)
        self.decode_head = UperHead([adapter_dim] * n, channels, num_classes, pool_scales, dropout)
        self.aux_index, self.aux_weight = aux_index, aux_weight
        self.aux_head = FCNHead(adapter_dim, aux_channels, num_classes, 1, dropout) if aux_weight > 0 else None
        self.avg_non_ignore = avg_non_ignore

    def features(self, imgs: Tensor) -> list[Tensor]:
        h, w = imgs.shape[-2:]
        feats = self.backbone(imgs)
        return [adapt(f[..., :-(-h // s), :-(-w // s)])
                for adapt, f, s in zip(self.adapters, feats, self.backbone.strides)]

    def forward(self, imgs: Tensor, labels: Optional[Tensor] = None):
        """imgs: (N, 3, H, W); labels: (N, H, W) int64 with 255 = ignore. Logits are float32."""
        feats = self.features(imgs)
        logits = self.decode_head(feats)
        if labels is None:  # float32 logits, upsampled in float32 (the argmax and window averaging follow)
            return _up(logits.float(), imgs.shape[-2:])
        parts = {"loss_decode": seg_cross_entropy(logits, labels, self.avg_non_ignore)}
        total = parts["loss_decode"]
        if self.aux_head is not None:
            parts["loss_aux"] = seg_cross_entropy(self.aux_head(feats[self.aux_index]), labels, self.avg_non_ignore)
            total = total + self.aux_weight * parts["loss_aux"]
        return total, parts
