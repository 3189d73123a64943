"""The pretraining config (main_pretrain.py) and how flags become one: ``resolve``."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from config.channels import PixelConfig, check_pixel_flags, pixel_values
from config.cli import resolve_run
from config.rules import DECAY, TRAINING_RULES, at_least, check_existing, check_ranges, unknown_choice
from config.sections import DataConfig, EpochSchedule, MaskConfig, OptimConfig
from engine.run import RunConfig
from engine.state import register_shaping, shaping
from errors import UsageError
import models
from models import PretrainContract


@register_shaping
@dataclass(frozen=True, kw_only=True)
class PretrainConfig(RunConfig, DataConfig, OptimConfig, EpochSchedule, MaskConfig, PixelConfig):
    """Everything a pretraining run is, resolved: main_pretrain.py's flags by name."""
    model: str                              # a registered pretraining model
    norm_pix_loss: bool = shaping()         # per-unit normalised pixel targets
    reference_decoder_order: bool           # the reference's decoder position order
    load_from: str = shaping()              # initial weights (strict)
    vis_freq: int                           # a reconstruction figure every N epochs (0: the end only)
    denorm: str                             # how figures undo norm-pix targets
    channels_last: bool
    decode: str                             # pil, fast or gpu (imagedata.decode)
    num_images: int = field(default=0, metadata={"flag": False})   # training images found
    # --- monitoring (engine/monitor.py) ---
    monitor_data: str                       # the labelled set of the feature monitors ("": none)
    monitor_freq: int                       # epochs between monitor points (and after the last epoch)
    save_best_monitor: bool                 # checkpoint-best.pth at the best monitor k-NN top-1
    on_nonfinite: str                       # stop, or rollback (engine.trainer.Recovery)
    max_rollbacks: int                      # rollbacks a run may take before it stops
    rollback_lr_scale: float                # the lr factor after a rollback (1: unchanged)
    rollback_lr_window: int                 # for this many optimizer steps (0: none)

    def model_kwargs(self, options: tuple[str, ...]) -> dict:
        """The factory keywords of the model: the ones every pretraining model takes, and the options
        its contract names (``options``)."""
        return model_kwargs(self, options)


def model_kwargs(flags, options: tuple[str, ...]) -> dict:
    """The factory keywords of --model from flags or a config: the ones every pretraining model
    takes, and those of the contract's ``options`` that are set."""
    kwargs = dict(norm_pix_loss=flags.norm_pix_loss, vis_mask_ratio=flags.vis_mask_ratio)
    if flags.input_size is not None:
        kwargs["img_size"] = flags.input_size
    if "mask_ratio" in options and flags.mask_ratio is not None:
        kwargs["mask_ratio"] = flags.mask_ratio
    if "reference_decoder_order" in options:
        kwargs["reference_decoder_order"] = flags.reference_decoder_order
    if getattr(flags, "in_chans", None) not in (None, 3):  # --in_chans (config.channels)
        kwargs["in_chans"] = flags.in_chans
    return kwargs


def unknown_model(name: str) -> str:
    """The line for a --model that is no pretraining model: a classifier is named as one, with the
    pretraining models whose checkpoints finetune into it (from the registry); another name gets the
    close pretraining names."""
    pretraining = models.list_models(task="pretrain")
    if name in models.list_models(task="classify"):
        own = models.pretraining_models_for(name)
        if own:
            return (f"--model {name} is a classifier (main_finetune.py trains it), not a pretraining model; its "
                    f"pretraining models: --model {' or '.join(own)}")
        return unknown_choice("model", name, pretraining, "valid pretraining models",
                              hint=" (a classifier that no pretraining model finetunes into)")
    return unknown_choice("model", name, pretraining, "valid pretraining models")


def check_flags(flags: argparse.Namespace) -> None:
    """What the flags alone can tell, before the model is described."""
    check_existing(flags, ["load_from"])
    check_ranges(flags, TRAINING_RULES + [("vis_freq", at_least(0)), ("monitor_freq", at_least(1)),
                                           ("max_rollbacks", at_least(1)), ("rollback_lr_window", at_least(0)),
                                           ("rollback_lr_scale", DECAY)])
    lowered = getattr(flags, "rollback_lr_scale", 1.0) != 1.0, getattr(flags, "rollback_lr_window", 0) > 0
    if any(lowered) and not all(lowered):
        raise UsageError("a lowered lr after a rollback needs both --rollback_lr_scale F (< 1) and "
                         "--rollback_lr_window N (> 0)")
    if any(lowered) and getattr(flags, "on_nonfinite", "stop") != "rollback":
        raise UsageError("--rollback_lr_scale / --rollback_lr_window act after a rollback: add --on_nonfinite rollback")
    check_pixel_flags(flags)
    if getattr(flags, "save_best_monitor", False) and not getattr(flags, "monitor_data", ""):
        raise UsageError("--save_best_monitor keeps the checkpoint of the best monitor score: give --monitor_data")
    if getattr(flags, "monitor_data", "") and flags.in_chans != 3:
        raise UsageError(f"--monitor_data reads 8-bit RGB images, but this run has --in_chans {flags.in_chans}: "
                         f"measure k-NN on a checkpoint instead (main_finetune.py --knn --finetune CHECKPOINT)")
    if not 0.0 <= flags.vis_mask_ratio < 1.0:
        raise UsageError(f"--vis_mask_ratio must be in [0, 1), got {flags.vis_mask_ratio}")


def check_decoder(flags: argparse.Namespace) -> None:
    """--decode gpu needs a CUDA device: the one the command line names, else one this machine has (a
    SLURM submission, ``flags.device_on_node``, leaves that to the compute node). One line naming the fix;
    the message names --device only when the command line gave it."""
    if flags.decode != "gpu":
        return
    if flags.device is not None and not str(flags.device).startswith("cuda"):
        raise UsageError(f"--decode gpu decodes on a CUDA device, but the command line gives --device {flags.device}: "
                         f"use --decode fast or pil")
    if getattr(flags, "device_on_node", False):
        return
    import torch
    if not torch.cuda.is_available():
        raise UsageError("--decode gpu decodes on a CUDA device and none is available here: use --decode fast or "
                         "pil, or run on a CUDA machine")


def resolve(flags: argparse.Namespace, contract: PretrainContract, num_images: int) -> PretrainConfig:
    """The run's config from its flags and its model's contract (built at --input_size with the
    flags' options); ``num_images``: the training images found. Pure: checks and defaults only."""
    check_decoder(flags)
    run = resolve_run(flags)
    if flags.vis_mask_ratio > 0 and not contract.secondary_mask:
        raise UsageError(f"{flags.model} has no secondary masking: use --vis_mask_ratio 0")
    mask_ratio = contract.default_mask_ratio if flags.mask_ratio is None else flags.mask_ratio
    input_size = contract.input_size
    expected = contract.grid(input_size)
    if flags.token_size is not None and flags.token_size != expected:
        raise UsageError(f"--token_size {flags.token_size} does not match --input_size {input_size} with "
                         f"{contract.stride}-px mask units: use --token_size {expected}")
    regular = flags.mask_regular or contract.mask_kind == "uniform"
    if regular:
        if contract.mask_kind == "random":
            raise UsageError(f"{flags.model} uses random masks: drop --mask_regular")
        if mask_ratio != 0.75:
            raise UsageError(f"--mask_regular keeps one unit per 2x2 group, so --mask_ratio must be 0.75 "
                             f"(got {mask_ratio})")
        if expected % 2:
            raise UsageError(f"--mask_regular needs an even --token_size (got {expected})")
    elif not 0.0 < mask_ratio < 1.0:
        raise UsageError(f"--mask_ratio must be in (0, 1), got {mask_ratio}")
    values = {f.name: getattr(flags, f.name) for f in dataclasses.fields(PretrainConfig) if hasattr(flags, f.name)}
    values.update(run)
    values.update(pixel_values(flags))  # --in_chans, --norm_stats (config.channels)
    values.update(input_size=input_size, token_size=expected, mask_ratio=mask_ratio, mask_regular=regular,
                  num_images=num_images)
    return PretrainConfig(**values)
