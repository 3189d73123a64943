"""The pixel section of the pretraining and finetuning configs: ``--in_chans`` and ``--norm_stats``
(imagedata.channels, imagedata.normstats). The flags themselves are in config/pixel_flags.py, which
imports no torch (``--help`` answers before torch loads)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from engine.state import register_shaping, shaping
from errors import UsageError
from imagedata.channels import Pixels


@register_shaping
@dataclass(frozen=True, kw_only=True)
class PixelConfig:
    """What the model's input pixels are."""
    in_chans: int = shaping(default=3)           # image channels (3: the reference's 8-bit RGB path)
    norm_stats: Optional[str] = None             # imagenet, auto or a JSON FILE (None: the checkpoint's, else imagenet)
    # the statistics themselves, once a run has them (imagedata.normstats): checkpoints and records keep them
    norm_mean: tuple[float, ...] = field(default=(), metadata={"flag": False})
    norm_std: tuple[float, ...] = field(default=(), metadata={"flag": False})

    @property
    def pixels(self) -> Pixels:
        """The channels and statistics (``norm_mean`` must be set: imagedata.normstats.run_pixels)."""
        return Pixels(self.in_chans, tuple(self.norm_mean), tuple(self.norm_std))


def check_pixel_flags(flags: argparse.Namespace) -> None:
    """What the flags alone can tell."""
    if flags.in_chans is not None and flags.in_chans < 1:
        raise UsageError(f"--in_chans must be >= 1, got {flags.in_chans}")
    if flags.in_chans not in (None, 3) and getattr(flags, "decode", "pil") != "pil":
        raise UsageError(f"--decode {flags.decode} decodes 8-bit RGB JPEGs: with --in_chans {flags.in_chans} "
                         f"use --decode pil")


def pixel_values(flags: argparse.Namespace, stored: Optional[Pixels] = None) -> dict:
    """The section's values from the flags and, for finetuning, the statistics a checkpoint stored
    (``stored``): the checkpoint's channels and statistics unless the flags name others."""
    from imagedata.normstats import check_spec
    in_chans = flags.in_chans if flags.in_chans is not None else (stored.in_chans if stored else 3)
    spec = None if flags.norm_stats == "checkpoint" else flags.norm_stats
    values = dict(in_chans=in_chans, norm_mean=(), norm_std=())
    if spec is None and stored is not None and stored.in_chans == in_chans:
        values.update(norm_stats="checkpoint", norm_mean=stored.mean, norm_std=stored.std)
        return values
    spec = spec or ("imagenet" if in_chans == 3 else "auto")
    check_spec(spec, in_chans)
    values["norm_stats"] = spec
    return values
