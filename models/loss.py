"""Reconstruction targets and losses (one place for every MIM method)."""
from __future__ import annotations

from torch import Tensor


def patchify(imgs: Tensor, unit: int) -> Tensor:
    """imgs: (N, C, H, W) -> (N, L, unit*unit*C), channel-last inside a unit
    (element order row-in-unit, column-in-unit, channel), units in raster order."""
    n, c, h, w = imgs.shape
    if h % unit or w % unit:
        raise ValueError(f"image {h}x{w} is not divisible into {unit}-px units")
    x = imgs.reshape(n, c, h // unit, unit, w // unit, unit)
    x = x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // unit) * (w // unit), unit * unit * c)


def unpatchify(x: Tensor, unit: int, channels: int = 3) -> Tensor:
    """x: (N, L, unit*unit*C) -> imgs (N, C, H, W), the inverse of ``patchify`` for square grids."""
    n, length, _ = x.shape
    g = int(length ** 0.5)
    if g * g != length:
        raise ValueError(f"{length} units do not form a square grid")
    x = x.reshape(n, g, g, unit, unit, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, g * unit, g * unit)


def unit_stats(target: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-unit mean and sqrt(unbiased var + eps) of patchified pixels: (N, L, 1) each."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return mean, (var + eps).sqrt()


def mae_loss(pred: Tensor, imgs: Tensor, mask: Tensor, unit: int, norm_pix_loss: bool) -> Tensor:
    """Mean squared error over the masked units (MAE / UM-MAE).

    pred: (N, L, unit*unit*3) in raster order; imgs: (N, 3, H, W); mask: (N, L), True = masked.
    Secondary-masked and visible units are excluded: only ``mask`` counts.
    """
    target = patchify(imgs, unit)
    if norm_pix_loss:
        mean, std = unit_stats(target)
        target = (target - mean) / std
    per_unit = (pred - target).pow(2).mean(dim=-1)
    weight = mask.to(per_unit.dtype)
    return (per_unit * weight).sum() / weight.sum()


def simmim_loss(pred: Tensor, imgs: Tensor, mask: Tensor, unit: int) -> Tensor:
    """SimMIM's L1 loss on the raw pixels of the masked units.

    pred: (N, L, unit*unit*3) raster order; mask: (N, L), True = masked.
    """
    target = patchify(imgs, unit)
    per_unit = (pred - target).abs().mean(dim=-1)
    weight = mask.to(per_unit.dtype)
    return (per_unit * weight).sum() / weight.sum()
