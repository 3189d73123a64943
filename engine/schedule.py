"""Learning-rate schedules: per-iteration linear warmup followed by a half-cycle cosine, by epochs
(MAE's schedule), and mmcv's poly schedule with linear warmup, by iterations (the segmentation
recipe). The step loop (engine.step) asks a schedule for the lr at each optimizer step and scales
it by each parameter group's ``lr_scale`` (layer decay)."""
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


class Schedule:
    """The learning rate at micro-step ``step`` of period ``period`` (each ``length`` micro-steps long)."""

    def __call__(self, period: int, step: int, length: int) -> float:
        raise NotImplementedError


class CosineSchedule(Schedule):
    """MAE's schedule, by (fractional) epochs: linear warmup, then half-cycle cosine to ``min_lr``."""

    def __init__(self, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> None:
        self.lr, self.min_lr, self.warmup_epochs, self.epochs = lr, min_lr, warmup_epochs, epochs

    def __call__(self, period: int, step: int, length: int) -> float:
        return lr_at(step / length + period, self.lr, self.min_lr, self.warmup_epochs, self.epochs)


class PolySchedule(Schedule):
    """mmcv's poly schedule, by iterations (the segmentation recipe): the iteration is
    ``period * length + step``."""

    def __init__(self, lr: float, min_lr: float, warmup_iters: int, total_iters: int, power: float = 1.0,
                 warmup_ratio: float = 1e-6) -> None:
        self.lr, self.min_lr, self.warmup_iters, self.total_iters = lr, min_lr, warmup_iters, total_iters
        self.power, self.warmup_ratio = power, warmup_ratio

    def __call__(self, period: int, step: int, length: int) -> float:
        return poly_lr_at(period * length + step, self.lr, self.min_lr, self.warmup_iters, self.total_iters,
                          self.power, self.warmup_ratio)
