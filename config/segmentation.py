"""The segmentation config (main_segmentation.py) and how flags become one: ``resolve``."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

from config.cli import resolve_run
from config.rules import Problems, check_existing
from config.sections import DataConfig, OptimConfig
from engine.run import RunConfig
from engine.state import register_shaping, shaping
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
    random_weights: bool                # --eval of untrained heads, asked for explicitly


# a flag only segmentation checkpoints store: how a checkpoint of this program is told from others
MARKER = "aux_channels"
# the flags that shape the model's weights: a trained checkpoint's own are used for --eval and --resume
# unless the command line gives them (then they must agree)
ARCHITECTURE = ("model", "channels", "aux_channels", "nb_classes")
# how the run built and evaluated its model: a checkpoint's own are the defaults (any value may be given)
EVAL_SETTINGS = ("input_size", "test_stride", "img_scale", "reduce_zero_label", "aux_weight")


def resolve(flags: argparse.Namespace, contract: Optional[ClassifierContract], dense_models) -> SegmentConfig:
    """The run's config from its flags and its backbone's contract (built at --input_size; None: the
    caller named a problem with --model or --input_size); ``dense_models()`` lists the valid backbones
    for the message. Pure: checks and defaults only; every problem found is named in one UsageError."""
    problems = Problems()
    for flag in ("batch_size", "iters", "accum_iter", "eval_interval", "nb_classes", "input_size", "test_stride"):
        if getattr(flags, flag) < 1:
            problems.add(f"--{flag} must be >= 1, got {getattr(flags, flag)}")
    if flags.nb_classes > 255:
        problems.add(f"--nb_classes {flags.nb_classes}: at most 255 (label 255 means ignore)")
    if not 0 < flags.ratio_range[0] <= flags.ratio_range[1]:
        problems.add(f"--ratio_range needs 0 < min <= max, got {flags.ratio_range}")
    if flags.test_stride > flags.input_size:
        problems.add(f"--test_stride {flags.test_stride} exceeds the window --input_size {flags.input_size}: "
                     f"pixels between windows would get no prediction; use --test_stride "
                     f"{max(1, flags.input_size * 2 // 3)} (two thirds of the window, as the recipe)")
    if (flags.warmup_iters < 0 or flags.warmup_iters >= flags.iters) and not flags.eval:
        problems.add(f"--warmup_iters {flags.warmup_iters} must be in [0, --iters {flags.iters}): the lr would never "
                     f"reach --lr; use --warmup_iters {max(0, flags.iters // 10)} (a tenth of the run) or fewer")
    if flags.random_weights and not flags.eval:
        problems.add("--random_weights is for --eval (a training run starts from --finetune or random weights)")
    if contract is not None and contract.pyramid is None:
        problems.add(f"--model {flags.model} has no feature pyramid; valid backbones: {', '.join(dense_models())}")
    with problems.check():
        check_existing(flags, ["finetune"])
    run = {}
    with problems.check():
        run = resolve_run(flags)
    problems.raise_any()
    values = {f.name: getattr(flags, f.name) for f in dataclasses.fields(SegmentConfig) if hasattr(flags, f.name)}
    values.update(run)
    values.update(opt_betas=tuple(flags.opt_betas), img_scale=tuple(flags.img_scale),
                  ratio_range=tuple(flags.ratio_range))
    if flags.eval:  # evaluate exactly the given weights: no resume, no TensorBoard folder
        values.update(auto_resume=False, log_dir=None)
    return SegmentConfig(**values)
