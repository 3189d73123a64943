"""Export weights for use outside this repository: ``model.safetensors`` (no pickle) + ``config.json``.

    # an encoder for downstream code (no head), from any checkpoint --finetune takes
    python tools/export.py --checkpoint work_dirs/pretrain/checkpoint-199.pth --model swin_tiny_256 \\
        --output exported/swin_tiny_ummae
    # a finetuned classifier with its 1000-class head, in timm's layout (refused if timm lacks the network)
    python tools/export.py --checkpoint ft/checkpoint-best.pth --model vit_base_patch16 --nb_classes 1000 \\
        --timm --output exported/vit_b_ft
    # a whole pretraining model (encoder + decoder) to continue pretraining elsewhere, or with --load_from
    python tools/export.py --checkpoint work_dirs/pretrain/checkpoint-199.pth --model mae_swin_tiny_256 \\
        --output exported/mae_swin_tiny_full

The input may be any file ``--finetune`` / ``--load_from`` reads, the original SimMIM, GreenMIM and
MixMIM checkpoints included (models.checkpoint_maps). The folder loads back with
``ummae_models.load_exported(folder)`` (pip install .; models.portable), strictly; where timm has the
network, ``config.json["timm"]`` gives the ``timm.create_model`` call (FINETUNE.md). A checkpoint
that keeps its run's channels and normalisation statistics passes them on (``config.json``:
``in_chans``, ``norm_mean``, ``norm_std``; the model is built with those channels).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from config.cli import run_main  # noqa: E402
from config.pretrain import model_kwargs  # noqa: E402
from engine.checkpoint import safe_load, stored_pixels  # noqa: E402
from errors import CheckpointError, UsageError  # noqa: E402
from models.checkpoint_maps import timm_target  # noqa: E402
from util.pretrained import load_pretrained, load_pretraining_weights  # noqa: E402


def _pretrain_kwargs(checkpoint: str, name: str, input_size: Optional[int]) -> dict:
    """The factory keywords a pretraining checkpoint of ours was trained with (its stored flags);
    none for other files (an export, another code base's checkpoint)."""
    kwargs: dict = {}
    if checkpoint.endswith(".pth"):
        ckpt = safe_load(checkpoint)
        flags = ckpt.get("config") if isinstance(ckpt, dict) else None
        if isinstance(flags, dict):
            defaults = dict(norm_pix_loss=False, vis_mask_ratio=0.0, input_size=None, mask_ratio=None,
                            reference_decoder_order=False)
            kwargs = model_kwargs(SimpleNamespace(**{**defaults, **flags}), models.describe_class(name).build_options)
    if input_size:
        kwargs["img_size"] = input_size
    return kwargs


def export(checkpoint: str, model_name: str, output: str, nb_classes: int = 0, input_size: Optional[int] = None,
           global_pool: bool = True, timm_layout: bool = False) -> Path:
    """Load ``checkpoint`` into ``model_name`` and write the folder ``output``; returns it."""
    if not models.is_model(model_name):
        raise UsageError(f"unknown --model {model_name!r}; valid: {', '.join(models.list_models())}")
    pretraining = model_name in models.list_models(task="pretrain")
    extra: dict = {"source_checkpoint": str(checkpoint)}
    pixels = stored_pixels(checkpoint) if str(checkpoint).endswith(".pth") else None  # the run's channels and statistics
    if pixels is not None:
        extra.update(in_chans=pixels.in_chans, norm_mean=list(pixels.mean), norm_std=list(pixels.std))
    if pretraining:
        if nb_classes or timm_layout:
            raise UsageError(f"{model_name} is a pretraining model: --nb_classes and --timm apply to classifiers")
        kwargs = _pretrain_kwargs(str(checkpoint), model_name, input_size)
        model = models.create_model(model_name, **kwargs)
        report = load_pretraining_weights(model, checkpoint)
        extra["classifier"] = models.classifier_for(model_name)
    else:
        kwargs = {"num_classes": nb_classes}
        if pixels is not None and pixels.in_chans != 3:
            kwargs["in_chans"] = pixels.in_chans
        if input_size:
            kwargs["img_size"] = input_size
        if "global_pool" in models.describe_class(model_name).build_options and not global_pool:
            kwargs["global_pool"] = False
        model = models.create_model(model_name, **kwargs)
        report = load_pretrained(model, checkpoint)
        if nb_classes and report.head_reinitialised:
            raise CheckpointError(f"{checkpoint} has no {nb_classes}-class head for {model_name}; export the "
                                  f"encoder with --nb_classes 0")
        try:
            target = timm_target(model_name, model)
            extra["timm"] = {"name": target.name, "kwargs": target.kwargs, "num_classes": nb_classes}
        except ValueError as e:
            if timm_layout:
                raise UsageError(str(e)) from None
            extra["timm"] = None
        if hasattr(model, "forward_pyramid"):  # what a dense head needs to know
            size = input_size or model.contract.input_size
            with torch.no_grad():
                feats = model.eval().forward_pyramid(torch.zeros(1, model.contract.in_chans, size, size))
            extra["stage_channels"] = [int(f.shape[1]) for f in feats]
            extra["stage_strides"] = [int(size // f.shape[-1]) for f in feats]
    model.eval()
    extra["load_report"] = report.summary()
    return models.save_exported(model, model_name, output, kwargs, extra)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="pretraining or finetuning checkpoint (ours or an original's)")
    p.add_argument("--model", required=True, help="registered model: a classifier (e.g. swin_tiny_256) exports "
                   "the encoder (and head with --nb_classes), a pretraining model (e.g. mae_swin_tiny_256) all of it")
    p.add_argument("--output", required=True, help="output folder (model.safetensors, config.json)")
    p.add_argument("--nb_classes", type=int, default=0, help="keep the checkpoint's head of this many classes "
                   "(0: encoder only)")
    p.add_argument("--input_size", type=int, default=None, help="build size (default: the model's own)")
    p.add_argument("--cls_token", action="store_true", help="ViT: the cls-token head instead of average pooling")
    p.add_argument("--timm", action="store_true", help="require timm's layout (refused when timm lacks the network)")
    a = p.parse_args(argv)
    out = export(a.checkpoint, a.model, a.output, a.nb_classes, a.input_size, not a.cls_token, a.timm)
    print(f"wrote {out / models.portable.WEIGHTS} and {out / models.portable.CONFIG}")
    return 0


if __name__ == "__main__":
    run_main(main)
