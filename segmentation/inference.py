"""Whole-image and sliding-window inference (mmseg's ``whole`` / ``slide`` test modes).

Sliding window: windows of ``crop`` pixels every ``stride`` pixels, the last row / column of
windows moved back to end at the border (so every window lies inside the image), logits summed
and divided by the number of windows covering each pixel. Windows are batched. A window
larger than the image is cut to the image, then zero-padded (after normalisation) to the full
crop, so the backbone always sees the training crop size; the padded part of its logits is
dropped. (mmseg feeds the cut window unpadded; with fixed-size backbones it cannot.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Top (or left) coordinates of the windows along one axis."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})


@torch.no_grad()
def slide_logits(model: nn.Module, img: Tensor, num_classes: int, crop: int, stride: int,
                 batch: int = 4) -> Tensor:
    """img: (1, 3, H, W) -> logits (1, K, H, W) averaged over overlapping windows."""
    if img.shape[0] != 1:
        raise ValueError("slide_logits takes one image at a time")
    _, _, h, w = img.shape
    ch, cw = min(crop, h), min(crop, w)
    boxes = [(y, x) for y in window_starts(h, crop, stride) for x in window_starts(w, crop, stride)]
    logits = img.new_zeros((1, num_classes, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    for i in range(0, len(boxes), batch):
        part = boxes[i:i + batch]
        crops = torch.cat([img[:, :, y:y + ch, x:x + cw] for y, x in part])
        if (ch, cw) != (crop, crop):
            crops = F.pad(crops, (0, crop - cw, 0, crop - ch))
        out = model(crops).float()[:, :, :ch, :cw]
        for (y, x), o in zip(part, out):
            logits[0, :, y:y + ch, x:x + cw] += o
            count[0, :, y:y + ch, x:x + cw] += 1
    return logits / count


@torch.no_grad()
def whole_logits(model: nn.Module, img: Tensor) -> Tensor:
    """img: (N, 3, H, W) -> logits (N, K, H, W) from one forward of the whole image."""
    return model(img).float()


@torch.no_grad()
def predict(model: nn.Module, img: Tensor, num_classes: int, mode: str = "slide", crop: int = 512,
            stride: int = 341, out_size=None) -> Tensor:
    """Class map (N, H', W') int64: logits of ``mode`` resized (bilinear) to ``out_size`` (default:
    the input size), then argmax, as mmseg rescales to the original image before the argmax."""
    if mode == "slide":
        logits = torch.cat([slide_logits(model, im[None], num_classes, crop, stride) for im in img])
    elif mode == "whole":
        logits = whole_logits(model, img)
    else:
        raise ValueError(f"unknown inference mode {mode!r}; valid: slide, whole")
    if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits.argmax(1)
