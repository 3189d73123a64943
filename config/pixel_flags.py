"""``--in_chans`` and ``--norm_stats`` for the pretraining and finetuning parsers (no torch import:
the parsers answer ``--help`` and flag errors before torch loads). Their config section is
config/channels.py."""
from __future__ import annotations

import argparse


def add_pixel_args(p: argparse.ArgumentParser, finetune: bool = False) -> None:
    """``--in_chans`` and ``--norm_stats`` (finetuning: both default to the --finetune checkpoint's)."""
    p.add_argument("--in_chans", default=None if finetune else 3, type=int,
                   help="image channels: 3 reads 8-bit RGB as the reference does; any other number reads 1- to "
                        "N-channel PNG, TIFF and .npy images at full precision (8/16-bit, float)"
                        + (" (default: the --finetune checkpoint's, else 3)" if finetune else " (default: 3)"))
    p.add_argument("--norm_stats", default=None, type=str,
                   help="per-channel normalisation: imagenet, auto (mean/std of a seeded sample of the training "
                        "set, cached as norm_stats.json in --output_dir) or a JSON FILE {\"mean\": [...], "
                        "\"std\": [...]} (default: " + ("the --finetune checkpoint's, else " if finetune else "")
                        + "imagenet with 3 channels, auto otherwise)")
