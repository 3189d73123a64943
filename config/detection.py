"""The detection config (main_detection.py) and how flags become one: ``resolve``."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from config.cli import resolve_run
from config.rules import check_existing
from config.sections import DataConfig, OptimConfig
from engine.run import RunConfig
from engine.state import register_shaping, shaping
from errors import UsageError
from models import ClassifierContract


@register_shaping
@dataclass(frozen=True, kw_only=True)
class DetectConfig(RunConfig, DataConfig, OptimConfig):
    """Everything a detection run is, resolved (``input_size``: the training crop)."""
    detector: str                       # gfl or mask_rcnn (detection.detector)
    epochs: int = shaping()
    model: str                          # the backbone: a classifier with a feature pyramid
    finetune: str = shaping()           # backbone weights
    ratio_range: tuple[float, float]
    test_size: tuple[int, int]
    drop_path: float = shaping()
    layer_decay: float = shaping()
    min_lr_ratio: float = shaping()
    warmup_iters: int = shaping()       # optimizer steps
    adapter_dim: int
    fpn_dim: int
    neck_norm: str
    score_thr: float
    max_dets: int
    eval: bool
    eval_freq: int

    @property
    def with_masks(self) -> bool:
        return self.detector == "mask_rcnn"


def resolve(flags: argparse.Namespace, contract: ClassifierContract) -> DetectConfig:
    """The run's config from its flags and its backbone's contract. Pure: checks and defaults only."""
    if contract.pyramid is None:
        raise UsageError(f"--model {flags.model} has no feature pyramid for dense prediction (Swin, PVT and ViT "
                         f"classifiers have one)")
    for flag in ("batch_size", "epochs", "accum_iter", "input_size", "fpn_dim", "adapter_dim", "eval_freq"):
        if getattr(flags, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(flags, flag)}")
    lo, hi = flags.ratio_range
    if not 0 < lo <= hi:
        raise UsageError(f"--ratio_range needs 0 < low <= high, got {lo} {hi}")
    if min(flags.test_size) < 1:
        raise UsageError(f"--test_size must be positive, got {flags.test_size}")
    if flags.fpn_dim % 32 and flags.neck_norm == "gn":
        raise UsageError(f"--neck_norm gn needs --fpn_dim divisible by 32, got {flags.fpn_dim}")
    check_existing(flags, ["finetune"])
    run = resolve_run(flags)
    values = {f.name: getattr(flags, f.name) for f in dataclasses.fields(DetectConfig) if hasattr(flags, f.name)}
    values.update(run)
    values.update(ratio_range=tuple(flags.ratio_range), test_size=tuple(flags.test_size))
    if flags.eval and flags.finetune:
        values["auto_resume"] = False  # evaluate exactly the --finetune weights
    return DetectConfig(**values)
