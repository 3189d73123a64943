"""The segmentation backbone: a registered classifier's feature pyramid, built and loaded by name.

``build_backbone(name, img_size, drop_path, checkpoint)`` -> (module, load report or None). The
module maps imgs (N, 3, H, W) to four maps (N, C_s, H_s, W_s), finest first, and has
``out_channels``. The classifier's pooling norm and head are not used (and not kept).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

import models


class ClassifierPyramid(nn.Module):
    """A Swin / PVT classifier's ``forward_pyramid``, the input zero-padded at the bottom / right to
    the nearest size the classifier accepts, every map cut back to the unpadded extent (ceil of
    its stride). Swin: each stage's grid a multiple of the window unless the map fits in one
    window; PVT: its position embedding's size (``img_size``)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        for unused in ("head", "fc_norm"):
            if hasattr(body, unused):
                setattr(body, unused, nn.Identity())
        self.body = body
        self.out_channels = list(body.stage_dims)

    def forward(self, imgs: Tensor) -> list[Tensor]:
        h, w = imgs.shape[-2:]
        ph, pw = (a - b for a, b in zip(padded_size(self.body, h, w), (h, w)))
        if ph or pw:
            imgs = F.pad(imgs, (0, pw, 0, ph))
        feats = self.body.forward_pyramid(imgs)
        stride = 4
        out = []
        for f in feats:
            out.append(f[..., :-(-h // stride), :-(-w // stride)])
            stride *= 2
        return out

    # layer-wise lr decay ids and weight-decay exemptions of the classifier, under "body."
    def lrd_num_layers(self) -> int:
        return len(self.body.blocks) + 1

    def lrd_layer_id(self, name: str) -> int:
        from util.lr_decay import layer_id
        return layer_id(self.body, name[len("body."):] if name.startswith("body.") else name, self.lrd_num_layers())

    def no_weight_decay(self) -> set[str]:
        return {f"body.{k}" for k in self.body.no_weight_decay()}


def _swin_ok(h: int, w: int, window: int, stages: int = 4) -> bool:
    for stage in range(stages):
        if min(h, w) > window and (h % window or w % window):
            return False
        if stage + 1 < stages:  # a 2x2 stride-2 merge follows
            if h % 2 or w % 2:
                return False
            h, w = h // 2, w // 2
    return True


def padded_size(body: nn.Module, h: int, w: int) -> tuple[int, int]:
    """The smallest (H, W) >= (h, w) that ``body.forward_pyramid`` accepts."""
    p = body.patch_size
    window = getattr(body, "window_size", None)
    if window is None:  # PVT
        if max(h, w) > body.img_size:
            raise ValueError(f"PVT built for {body.img_size}-px inputs cannot take {h}x{w}: use --test_mode slide")
        return body.img_size, body.img_size
    step = p * 8  # three 2x merges after the patch embedding
    up = lambda v: -(-v // step) * step
    h0, w0 = up(h), up(w)
    for total in range(0, 64 * window * p, step):  # grow the pair by the least area first
        for dh in range(0, total + 1, step):
            if _swin_ok((h0 + dh) // p, (w0 + total - dh) // p, window):
                return h0 + dh, w0 + total - dh
    s = -(-max(h, w) // (step * window)) * step * window
    return s, s


def build_backbone(name: str, img_size: int, drop_path: float = 0.1,
                   checkpoint: Optional[str] = None):
    body = models.create_model(name, num_classes=0, img_size=img_size, drop_path_rate=drop_path)
    report = None
    if checkpoint:
        from util.pretrained import load_pretrained
        report = load_pretrained(body, checkpoint)
    return ClassifierPyramid(body), report
