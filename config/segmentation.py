"""The segmentation config (main_segmentation.py) and how flags become one: ``resolve``."""
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
class SegmentConfig(RunConfig, DataConfig, OptimConfig):
    """Everything a segmentation run is, resolved. Training counts iterations (micro-steps): the
    run's periods are its evaluation intervals (``eval_interval`` iterations each)."""
    iters: int = shaping()
    model: str                          # the backbone: a classifier with a feature pyramid
    drop_path: float = shaping()
    opt_betas: tuple[float, float]
    layer_decay: float = shaping()
    min_lr: float = shaping()
    power: float = shaping()
    warmup_iters: int = shaping()
    warmup_ratio: float = shaping()
    img_scale: tuple[int, int]
    ratio_range: tuple[float, float]
    cat_max_ratio: float
    photometric: bool
    reduce_zero_label: bool
    channels: int
    aux_channels: int
    aux_weight: float
    dropout: float
    avg_non_ignore: bool
    test_mode: str
    test_stride: int
    eval_interval: int
    finetune: str = shaping()
    nb_classes: int = shaping()
    eval: bool


def resolve(flags: argparse.Namespace, contract: ClassifierContract, dense_models) -> SegmentConfig:
    """The run's config from its flags and its backbone's contract (built at --input_size);
    ``dense_models()`` lists the valid backbones for the message. Pure: checks and defaults only."""
    for flag in ("batch_size", "iters", "accum_iter", "eval_interval", "nb_classes", "input_size", "test_stride"):
        if getattr(flags, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(flags, flag)}")
    if flags.nb_classes > 255:
        raise UsageError(f"--nb_classes {flags.nb_classes}: at most 255 (label 255 means ignore)")
    if not 0 < flags.ratio_range[0] <= flags.ratio_range[1]:
        raise UsageError(f"--ratio_range needs 0 < min <= max, got {flags.ratio_range}")
    if flags.test_stride > flags.input_size:
        raise UsageError(f"--test_stride {flags.test_stride} exceeds the window --input_size {flags.input_size}: "
                         f"pixels between windows would get no prediction")
    if flags.warmup_iters < 0 or flags.warmup_iters >= flags.iters and not flags.eval:
        raise UsageError(f"--warmup_iters {flags.warmup_iters} must be in [0, --iters {flags.iters})")
    if contract.pyramid is None:
        raise UsageError(f"--model {flags.model} has no feature pyramid; valid backbones: {', '.join(dense_models())}")
    check_existing(flags, ["finetune"])
    run = resolve_run(flags)
    values = {f.name: getattr(flags, f.name) for f in dataclasses.fields(SegmentConfig) if hasattr(flags, f.name)}
    values.update(run)
    values.update(opt_betas=tuple(flags.opt_betas), img_scale=tuple(flags.img_scale),
                  ratio_range=tuple(flags.ratio_range))
    if flags.eval and flags.finetune:
        values["auto_resume"] = False  # evaluate exactly the --finetune weights
    return SegmentConfig(**values)
