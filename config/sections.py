"""The sections a program's config is made of: frozen dataclasses whose fields are the flags.

A program's config (config/pretrain.py, finetune.py, detection.py, segmentation.py) is one frozen
dataclass that inherits the sections it has, so every value keeps its MAE flag name
(``config.batch_size``, ``config.mask_ratio``), a component can declare the one section it reads,
and ``dataclasses.asdict(config)`` is the flat, plain record that checkpoints (``args``, ``config``)
and run records keep. The engine owns the run section (engine.run.RunConfig).

Fields marked ``shaping()`` shape a run: a resume with another value is refused unless asked for
(engine.state). A config holds resolved values only: ``resolve`` functions make them from the
flags and the model's contract, without side effects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.state import register_shaping, shaping
from engine.step import StepSettings


@register_shaping
@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What is read and at which size."""
    data_path: Optional[str]                # None: the bundled sample photographs (pretraining)
    batch_size: int                         # images per process and micro-step
    input_size: int = shaping()             # pixels (the model's native size unless given)


@register_shaping
@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW (LARS for the linear probe) and its step."""
    accum_iter: int                         # micro-steps per optimizer step
    lr: Optional[float] = shaping()         # absolute; None until start-up makes it blr * effective batch / 256
    weight_decay: float = shaping()
    clip_grad: Optional[float] = None       # gradient-norm clipping (None: off)


@register_shaping
@dataclass(frozen=True, kw_only=True)
class EpochSchedule:
    """MAE's cosine schedule, by epochs (pretraining, finetuning)."""
    epochs: int = shaping()
    warmup_epochs: float = shaping()
    min_lr: float = shaping()
    blr: float = shaping()                  # base lr per 256 images (lr when --lr is not given)


@register_shaping
@dataclass(frozen=True, kw_only=True)
class MaskConfig:
    """How pretraining masks are drawn (models.masking)."""
    mask_ratio: float = shaping()           # fraction of mask units removed
    mask_regular: bool = shaping()          # uniform sampling: one kept unit per 2x2 group
    vis_mask_ratio: float = shaping()       # secondary masking of the kept units (0: off)
    token_size: int = 0                     # mask-unit grid side (input_size / unit)


def effective_batch(batch_size: int, accum_iter: int, world_size: int) -> int:
    return batch_size * accum_iter * world_size


def effective_lr(flags, world_size: int) -> float:
    """lr = blr * batch_size * accum_iter * world_size / 256 unless --lr is given."""
    if flags.lr is not None:
        return flags.lr
    return flags.blr * effective_batch(flags.batch_size, flags.accum_iter, world_size) / 256


def step_settings(config) -> StepSettings:
    """How the micro-steps of a run go, from its config."""
    return StepSettings(accum=config.accum_iter, clip=config.clip_grad, amp=config.amp, print_every=config.print_freq,
                        seed=config.seed, num_workers=config.num_workers, max_skipped=config.max_skipped,
                        dist_timeout=config.dist_timeout, data_advice=data_advice(config))


def data_advice(config) -> str:
    """What the data-wait warning may suggest: only what this program offers (--decode where it has the
    flag; tar shards for the image programs, pretraining and finetuning, which read them)."""
    tips = ["raise --num_workers"]
    if hasattr(config, "decode"):
        tips.append("try --decode fast or gpu")
    if isinstance(config, EpochSchedule):
        tips.append("read tar shards (tools/make_shards.py; PRETRAIN.md, data loading)")
    return ", ".join(tips[:-1]) + (" or " if len(tips) > 1 else "") + tips[-1]
