"""Backbones for dense prediction, built from the framework's classifiers.

``build_backbone(model_name, checkpoint)`` creates the classifier, loads any pretraining or
finetuning checkpoint through util.pretrained (printing its load report), drops the
classification head and wraps the model's ``forward_pyramid``:

    backbone = build_backbone("swin_tiny_256", "work_dirs/finetune/checkpoint-99.pth")
    feats = backbone(images)          # images (N, 3, H, W), any H, W
    backbone.out_channels             # [96, 192, 384, 768]
    backbone.strides                  # [4, 8, 16, 32]; feats[i]: (N, C_i, ceil(H/32)*32/s_i, ...)

Everything is asked from the model (``pyramid_channels``, ``pyramid_strides``,
``pyramid_divisor``), never from its name. A single-scale model (a plain ViT: every map at
the patch stride) gets ViTDet's simple feature pyramid over its last map: strides p/4, p/2,
p and 2p. Layer-wise lr decay and weight-decay groups come from ``dense_param_groups``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from timm.layers import LayerNorm2d
from torch import Tensor, nn

import models
from models.layers import pad_to_multiple
from util.lr_decay import layer_id, num_layers_for_decay
from util.pretrained import load_pretrained

__all__ = ["DenseBackbone", "SimpleFeaturePyramid", "build_backbone", "dense_models", "dense_param_groups"]


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
    return all(hasattr(model, a) for a in ("forward_pyramid", "pyramid_channels", "pyramid_strides",
                                           "pyramid_divisor"))


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
                             f"listed by dense.backbone.dense_models()")
        self.body = model
        channels, strides = list(model.pyramid_channels), list(model.pyramid_strides)
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
        self.size_divisor: int = math.lcm(int(model.pyramid_divisor), max(strides))
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
    """Registered classifiers that can serve as dense backbones (asked from each model)."""
    names = []
    for name in models.list_models(task="classify"):
        try:
            with torch.device("meta"):
                m = models.create_model(name, num_classes=0)
        except Exception:
            continue
        if has_pyramid(m):
            names.append(name)
    return names


def build_backbone(model_name: str, checkpoint: str = "", drop_path: float = 0.1, img_size: Optional[int] = None,
                   log: Callable[[str], None] = print) -> DenseBackbone:
    """The classifier ``model_name`` (built at its native size unless ``img_size``) with
    ``checkpoint`` loaded (any pretraining / finetuning file util.pretrained accepts; a file
    that does not fit raises CheckpointError naming the model it looks like), head removed.

    The built size only sets the stored position-embedding grid (PVT, ViT), which
    ``forward_pyramid`` resizes to every input; keep the pretraining size, as the reference does.
    """
    kwargs = {"num_classes": 0, "drop_path_rate": drop_path}
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = models.create_model(model_name, **kwargs)
    if not has_pyramid(model):  # before loading anything
        DenseBackbone(model)
    if checkpoint:
        report = load_pretrained(model, checkpoint)
        log(f"backbone {model_name}: {report.summary()}")
    # classification-only modules take no part in forward_pyramid: no unused parameters under DDP
    # (forward_pyramid returns block outputs before any final norm)
    for attr in ("head", "fc_norm", "head_drop", "norm"):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
    return DenseBackbone(model)


DECAY_RULES = ("mmdet", "beit")


def dense_param_groups(model: nn.Module, backbone: DenseBackbone, weight_decay: float, layer_decay: float = 1.0,
                       no_weight_decay: tuple[str, ...] = (), rule: str = "mmdet") -> list[dict]:
    """AdamW groups for a whole dense model holding ``backbone``.

    Backbone body parameters get the layer-wise scale ``layer_decay ** (num_layers - id)``
    of util.lr_decay (the reference's layer ids); every other parameter (simple feature
    pyramid, adapters, neck, head) scale 1. Groups carry ``lr_scale`` (read by util.lr_sched).

    Weight decay follows the reference's optimizer constructor of each task (``rule``):
      * ``"mmdet"`` (detection; mmdet's ``custom_keys`` pos_embed / norm / bias, matched against the
        reference's parameter names): no decay for the body's 1-D tensors (its norms and biases),
        its ``no_weight_decay()`` names (``pos_embed``, ...) and every bias. Norm weights outside the
        body (adapter LayerNorms, FPN BatchNorms, head GroupNorms) are decayed: the reference names
        them ``upK.0``, ``bn``, ``gn``, which match none of the keys.
      * ``"beit"`` (segmentation; the BEiT layer-decay constructor): no decay for every 1-D tensor
        and every bias; everything else is decayed, ``pos_embed`` included (that constructor
        compares ``'pos_embed'`` with the full name ``backbone.pos_embed``, which never matches).
    Names containing any of ``no_weight_decay`` are never decayed.
    """
    if rule not in DECAY_RULES:
        raise ValueError(f"weight-decay rule {rule!r}: valid choices are {', '.join(DECAY_RULES)}")
    body = backbone.body
    body_names = {id(p): n for n, p in body.named_parameters()}
    skip = set(body.no_weight_decay()) if hasattr(body, "no_weight_decay") else set()
    n_layers = num_layers_for_decay(body)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bname = body_names.get(id(p))
        lid = layer_id(body, bname, n_layers) if bname is not None else n_layers
        if rule == "mmdet":
            no_decay = name.endswith(".bias") or (bname is not None and (p.ndim == 1 or bname in skip))
        else:
            no_decay = p.ndim == 1 or name.endswith(".bias")
        no_decay = no_decay or any(k in name for k in no_weight_decay)
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "lr_scale": layer_decay ** (n_layers - lid),
                           "layer_id": lid, "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
