"""Per-iteration linear warmup followed by a half-cycle cosine (MAE's schedule), and mmcv's poly
schedule with linear warmup (the segmentation recipe)."""
from __future__ import annotations

import math


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch: linear from 0 over the warmup, then cosine to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def poly_lr_at(it: int, lr: float, min_lr: float, warmup_iters: int, total_iters: int, power: float = 1.0,
               warmup_ratio: float = 1e-6) -> float:
    """mmcv's PolyLrUpdaterHook at iteration ``it`` (0-based): (lr - min_lr) (1 - it / total)^power
    + min_lr; during the linear warmup that value is scaled from ``warmup_ratio`` up to 1."""
    value = (lr - min_lr) * (1 - it / total_iters) ** power + min_lr
    if it < warmup_iters:
        value *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return value


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Write the scheduled lr into every group, times the group's ``lr_scale`` (layer decay).
    A program with another schedule sets ``args.lr_schedule`` to a function of the fractional epoch."""
    schedule = getattr(args, "lr_schedule", None)
    if callable(schedule):
        value = schedule(epoch)
    else:
        value = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)
    return value
