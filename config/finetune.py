"""The finetuning config (main_finetune.py, main_linprobe.py: finetuning, linear probing, k-NN and
evaluation) and how flags become one: ``resolve``."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from config.channels import PixelConfig, check_pixel_flags, pixel_values
from config.cli import resolve_run
from config.rules import (DECAY, NON_NEGATIVE, POSITIVE, TRAINING_RULES, UNIT, UNIT_RIGHT_OPEN, Problems,
                          at_least, check_auto_augment, check_existing, check_ranges)
from config.sections import DataConfig, EpochSchedule, OptimConfig
from engine.run import RunConfig
from engine.state import register_shaping, shaping
from errors import UsageError
from imagedata.channels import Pixels, check_colour_ops
from imagedata.datasets import ImageList, num_classes_of
from models import ClassifierContract

FINETUNE_RULES = TRAINING_RULES + [
    ("drop_path", UNIT_RIGHT_OPEN), ("layer_decay", DECAY), ("color_jitter", NON_NEGATIVE),
    ("smoothing", UNIT_RIGHT_OPEN), ("reprob", UNIT), ("recount", at_least(1)), ("mixup", NON_NEGATIVE),
    ("cutmix", NON_NEGATIVE), ("cutmix_minmax", DECAY), ("mixup_prob", UNIT), ("mixup_switch_prob", UNIT),
    ("nb_classes", at_least(1)), ("knn_k", at_least(1)), ("knn_t", POSITIVE), ("eval_freq", at_least(1)),
]
RANDOM_ERASING_MODES = ("pixel", "rand", "const")


@register_shaping
@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(RunConfig, DataConfig, OptimConfig, EpochSchedule, PixelConfig):
    """Everything a finetuning, linear-probe, k-NN or evaluation run is, resolved."""
    model: str                                    # a registered classifier
    drop_path: float = shaping()
    layer_decay: float = shaping()
    color_jitter: Optional[float]
    min_crop_scale: float
    aa: Optional[str]                             # timm auto-augment policy (None: off)
    smoothing: float
    reprob: float
    remode: str
    recount: int
    resplit: bool
    mixup: float
    cutmix: float
    cutmix_minmax: Optional[tuple[float, ...]]
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    finetune: str = shaping()                     # initial weights: a pretraining or finetuning checkpoint
    global_pool: bool
    nb_classes: int = shaping()
    eval: bool
    dist_eval: bool
    linprobe: bool = shaping()
    knn: bool
    knn_k: int
    knn_t: float
    eval_freq: int
    num_train: int = field(default=0, metadata={"flag": False})   # images found per split
    num_val: int = field(default=0, metadata={"flag": False})

    @property
    def mode(self) -> str:
        return "knn" if self.knn else "eval" if self.eval else "linprobe" if self.linprobe else "finetune"

    @property
    def uses_mixup(self) -> bool:
        return not self.linprobe and (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None)

    def model_kwargs(self, options: tuple[str, ...]) -> dict:
        """The factory keywords of the classifier: the ones every classifier takes, and its contract's options."""
        kwargs = dict(num_classes=self.nb_classes,
                      drop_path_rate=0.0 if (self.linprobe or self.knn) else self.drop_path, img_size=self.input_size)
        if "global_pool" in options:
            kwargs["global_pool"] = self.global_pool
        if self.in_chans != 3:  # --in_chans (config.channels)
            kwargs["in_chans"] = self.in_chans
        return kwargs


def check_flags(flags: argparse.Namespace) -> None:
    """What the flags alone can tell, before the model is described or the data listed; every problem
    found is named in one UsageError."""
    problems = Problems()
    with problems.check():
        check_existing(flags, ["finetune"])
    if not (flags.data_path or "").endswith(".tar"):  # (a shard pattern is checked by image_list)
        with problems.check():
            check_existing(flags, ["data_path"], kind="dir")
    with problems.check():
        check_ranges(flags, FINETUNE_RULES)
    with problems.check():
        check_pixel_flags(flags)
    if flags.remode not in RANDOM_ERASING_MODES:
        problems.add(f"--remode {flags.remode!r}: valid choices are {', '.join(RANDOM_ERASING_MODES)}")
    if flags.cutmix_minmax is not None:
        if len(flags.cutmix_minmax) != 2:
            problems.add(f"--cutmix_minmax takes two numbers (min max), got {flags.cutmix_minmax}")
        elif not flags.cutmix_minmax[0] < flags.cutmix_minmax[1]:
            problems.add(f"--cutmix_minmax {flags.cutmix_minmax[0]} {flags.cutmix_minmax[1]}: valid values are "
                         f"min < max, both in (0, 1]")
    training = not (flags.knn or flags.eval)
    if training:
        with problems.check():
            if not flags.linprobe:
                check_auto_augment(no_policy(flags.aa))
        if flags.warmup_epochs > flags.epochs > 0:  # (a warmup over the whole run still reaches the peak lr)
            problems.add(f"--warmup_epochs {flags.warmup_epochs} is longer than --epochs {flags.epochs}: the lr "
                         f"would never reach its peak; use --warmup_epochs {max(1, flags.epochs // 10)} or fewer")
    if flags.linprobe and flags.knn:
        problems.add("--linprobe and --knn are different modes: choose one")
    if not 0.0 < flags.min_crop_scale <= 1.0:
        problems.add(f"--min_crop_scale must be in (0, 1], got {flags.min_crop_scale}")
    problems.raise_any()


def resolve(flags: argparse.Namespace, contract: ClassifierContract, train: Optional[ImageList],
            val: ImageList, stored: Optional[Pixels] = None) -> FinetuneConfig:
    """The run's config from its flags, its classifier's contract (built at --input_size) and the
    splits found (``train`` None: an evaluate-only run); ``stored``: the channels and statistics
    the --finetune checkpoint keeps. Pure: checks and defaults only."""
    run = resolve_run(flags)
    pixels = pixel_values(flags, stored)  # --in_chans, --norm_stats (config.channels)
    if not (flags.eval or flags.linprobe or flags.knn):
        check_colour_ops(pixels["in_chans"], no_policy(flags.aa), flags.color_jitter)
    mixup = flags.mixup > 0 or flags.cutmix > 0 or flags.cutmix_minmax is not None
    if mixup and flags.batch_size % 2 and not (flags.eval or flags.linprobe or flags.knn):
        raise UsageError(f"Mixup/CutMix needs an even --batch_size (got {flags.batch_size})")
    found = max(num_classes_of(val), num_classes_of(train) if train is not None else 0)
    if train is not None and train.classes and val.classes and train.classes != val.classes:
        raise UsageError(f"train/ and val/ have different class folders ({len(train.classes)} vs {len(val.classes)})")
    if flags.nb_classes is not None and found != flags.nb_classes:
        raise UsageError(f"--nb_classes {flags.nb_classes} disagrees with the data: {flags.data_path} has "
                         f"{found} classes")
    values = {f.name: getattr(flags, f.name) for f in dataclasses.fields(FinetuneConfig) if hasattr(flags, f.name)}
    values.update(run)
    values.update(pixels)
    values.update(input_size=contract.input_size, nb_classes=found, aa=no_policy(flags.aa), cutmix_minmax=tuple(flags.cutmix_minmax) if flags.cutmix_minmax is not None else None,
                  num_train=len(train) if train is not None else 0, num_val=len(val))
    if flags.eval and flags.finetune:
        values["auto_resume"] = False  # evaluate exactly the --finetune weights, not a checkpoint in --output_dir
    return FinetuneConfig(**values)


def no_policy(aa: Optional[str]) -> Optional[str]:
    """--aa 'none' (or empty) means no auto-augment policy."""
    return None if aa in ("none", "None", "") else aa
