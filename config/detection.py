"""The detection config (main_detection.py) and how flags become one: ``resolve``."""
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
    random_weights: bool                # --eval of an untrained detector, asked for explicitly
    eval_freq: int

    @property
    def with_masks(self) -> bool:
        return self.detector == "mask_rcnn"


# a flag only detection checkpoints store: how a checkpoint of this program is told from others
MARKER = "detector"
# the flags that shape the detector's weights: a trained checkpoint's own are used for --eval and
# --resume unless the command line gives them (then they must agree)
ARCHITECTURE = ("detector", "model", "adapter_dim", "fpn_dim", "neck_norm")
# how the run evaluated: a checkpoint's own are the defaults of --eval and --resume (any value may be given)
EVAL_SETTINGS = ("test_size", "score_thr", "max_dets")


def resolve(flags: argparse.Namespace, contract: Optional[ClassifierContract]) -> DetectConfig:
    """The run's config from its flags and its backbone's contract (None: an unknown --model, named
    by the caller; the other flags are still checked). Pure: checks and defaults only; every problem
    found is named in one UsageError."""
    problems = Problems()
    if contract is not None and contract.pyramid is None:
        problems.add(f"--model {flags.model} has no feature pyramid for dense prediction (Swin, PVT and ViT "
                     f"classifiers have one)")
    for flag in ("batch_size", "epochs", "accum_iter", "input_size", "fpn_dim", "adapter_dim", "eval_freq"):
        if getattr(flags, flag) < 1:
            problems.add(f"--{flag} must be >= 1, got {getattr(flags, flag)}")
    if flags.warmup_iters < 0:
        problems.add(f"--warmup_iters must be >= 0, got {flags.warmup_iters}")
    lo, hi = flags.ratio_range
    if not 0 < lo <= hi:
        problems.add(f"--ratio_range needs 0 < low <= high, got {lo} {hi}")
    if min(flags.test_size) < 1:
        problems.add(f"--test_size must be positive, got {flags.test_size}")
    if flags.fpn_dim % 32 and flags.neck_norm == "gn":
        problems.add(f"--neck_norm gn needs --fpn_dim divisible by 32, got {flags.fpn_dim}")
    if flags.random_weights and not flags.eval:
        problems.add("--random_weights is for --eval (a training run starts from --finetune or random weights)")
    with problems.check():
        check_existing(flags, ["finetune"])
    run = {}
    with problems.check():
        run = resolve_run(flags)
    problems.raise_any()
    values = {f.name: getattr(flags, f.name) for f in dataclasses.fields(DetectConfig) if hasattr(flags, f.name)}
    values.update(run)
    values.update(ratio_range=tuple(flags.ratio_range), test_size=tuple(flags.test_size))
    if flags.eval:  # evaluate exactly the given weights: no resume, no TensorBoard folder
        values.update(auto_resume=False, log_dir=None)
    return DetectConfig(**values)
