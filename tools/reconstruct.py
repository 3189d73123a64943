"""Reconstructions of chosen images from a pretraining checkpoint (the training figure, on your images).

    python tools/reconstruct.py --checkpoint out/checkpoint-last.pth --images a.jpg b.png dir/ --output rec.png
    python tools/reconstruct.py --checkpoint mae_swin_tiny_256.pth --model mae_swin_tiny_256 \\
        --reference_decoder_order --norm_pix_loss --vis_mask_ratio 0.25 --images data/sample_images

Works for every pretraining model (UM-MAE, MAE, SimMIM, GreenMIM, MixMAE). Our checkpoints carry
the model name and its flags; the reference's released full checkpoints (encoder + decoder) need
``--model`` and the flags they were trained with, and ``--reference_decoder_order`` for the
reference's decoder position order. Masks are the model's kind (uniform for pyramid UM-MAE,
random otherwise), drawn from ``--seed``; ``--denorm`` as in main_pretrain.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.cli import ArgumentParser, answer_usage_first, run_main  # noqa: E402

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".npy")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="pretraining checkpoint (ours or the reference's full one)")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    p.add_argument("--output", default="reconstruction.png", help="PNG to write")
    p.add_argument("--model", default=None, help="pretraining model; default: the name stored in the checkpoint")
    p.add_argument("--input_size", type=int, default=None, help="default: the checkpoint's, else the model's")
    p.add_argument("--mask_ratio", type=float, default=None, help="default: the checkpoint's, else the model's")
    p.add_argument("--vis_mask_ratio", type=float, default=None,
                   help="secondary masking ratio; default: the checkpoint's, else 0")
    p.add_argument("--norm_pix_loss", action="store_true", default=None,
                   help="the model predicts norm-pix targets; default: the checkpoint's")
    p.add_argument("--reference_decoder_order", action="store_true", default=None,
                   help="the reference's decoder position order (its released UM-MAE checkpoints)")
    p.add_argument("--denorm", default="neighbour", choices=["neighbour", "true"],
                   help="norm-pix de-normalisation: nearest seen unit's statistics, or the true (leaking) ones")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")
    p.add_argument("--max_images", type=int, default=16, help="at most this many images (one row each)")
    # channels and statistics (imagedata/channels.py, imagedata/normstats.py)
    p.add_argument("--norm_stats", default=None,
                   help="imagenet or a JSON FILE of per-channel mean/std; default: the checkpoint's, else imagenet")
    p.add_argument("--vis_bands", type=int, nargs="+", default=None,
                   help="channels shown: one (grey) or three (as R, G, B); default: 0 1 2, or 0 for 1-2 channels")
    return p


# --help and flag errors answer before torch loads
answer_usage_first(get_args_parser, __name__ == "__main__")

import torch  # noqa: E402

import models  # noqa: E402
from engine.checkpoint import safe_load, unwrap_state_dict  # noqa: E402
from errors import UsageError  # noqa: E402
from config.pretrain import model_kwargs  # noqa: E402
from config.rules import unknown_choice  # noqa: E402


def find_images(paths: list[str], limit: int) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXT)
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"--images: {p} is neither a file nor a folder")
    if not found:
        raise UsageError(f"--images: no images ({', '.join(IMAGE_EXT)}) in {' '.join(paths)}")
    return found[:limit]


def not_pretraining(name: str, checkpoint: str, given: bool) -> str:
    """Why ``name`` cannot draw a reconstruction: blamed on --model only when the user gave it; a
    classifier (a finetuning or dense checkpoint's model) names the pretraining models of its backbone."""
    pretraining = models.list_models(task="pretrain")
    if given:
        subject = f"--model {name!r} is not a pretraining model"
    else:
        subject = f"{checkpoint} holds {name}, not a pretraining model (it has no decoder to reconstruct with)"
    if models.is_model(name):
        own = models.pretraining_models_for(name)
        hint = (f"; a checkpoint of {', '.join(own)} (main_pretrain.py's output) draws reconstructions" if own else
                "; reconstructions need a checkpoint written by main_pretrain.py")
        return subject + hint
    return unknown_choice("model", name, pretraining, "valid pretraining models")


def build(args) -> tuple[torch.nn.Module, argparse.Namespace]:
    """The model the checkpoint holds, its flags merged with the command line's."""
    ckpt = safe_load(args.checkpoint)
    saved = vars(ckpt.get("args", argparse.Namespace())) if isinstance(ckpt, dict) else {}
    name = args.model or (ckpt.get("model_name") if isinstance(ckpt, dict) else None) or saved.get("model")
    if name is None:
        raise UsageError(f"{args.checkpoint} does not name its model (a reference checkpoint?): pass --model; "
                         f"valid: {', '.join(models.list_models(task='pretrain'))}")
    if name not in models.list_models(task="pretrain"):
        raise UsageError(not_pretraining(name, args.checkpoint, given=bool(args.model)))
    flags = argparse.Namespace(model=name)
    for key, default in (("input_size", None), ("mask_ratio", None), ("vis_mask_ratio", 0.0),
                         ("norm_pix_loss", False), ("reference_decoder_order", False)):
        value = getattr(args, key)
        setattr(flags, key, value if value is not None else saved.get(key, default))
    flags.pixels = checkpoint_pixels(args.norm_stats, saved)
    flags.in_chans = flags.pixels.in_chans
    kwargs = model_kwargs(flags, models.describe_class(name).build_options)
    model = models.create_model(name, **kwargs)
    state = unwrap_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"{args.checkpoint} does not fit {name} (built with {kwargs}): "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    flags.input_size = model.contract.input_size
    if flags.mask_ratio is None:
        flags.mask_ratio = model.contract.default_mask_ratio
    return model.eval(), flags


def checkpoint_pixels(norm_stats, saved: dict):
    """The channels and statistics of the figure: the checkpoint's (its run's flags), unless --norm_stats."""
    from imagedata.channels import RGB, Pixels
    from imagedata.normstats import read_file
    in_chans = int(saved.get("in_chans") or 3)
    if norm_stats == "imagenet" or (norm_stats is None and not saved.get("norm_mean")):
        if in_chans != 3:
            raise UsageError(f"--norm_stats imagenet has 3 channels, the checkpoint's model takes {in_chans}: "
                             f"pass a JSON FILE")
        return RGB
    if norm_stats is not None:
        return read_file(norm_stats, in_chans)
    return Pixels(in_chans, tuple(saved["norm_mean"]), tuple(saved["norm_std"]))


def load_images(files: list[Path], input_size: int, pixels=None) -> list[torch.Tensor]:
    """(C, input_size, input_size) normalised tensors of the readable files, decoded as training decodes
    them (imagedata.images.decode_rgb: 16-bit images scaled to 8 bits, not clipped to white; for another
    channel count than 3, imagedata.channels at full precision); each unreadable file is named on stderr."""
    from imagedata.channels import RGB, ChannelMismatch, load_pixels
    from imagedata.images import decode_rgb
    from util.visualize import figure_transform
    pixels = pixels or RGB
    tf = figure_transform(input_size, pixels)
    imgs = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                if pixels.arrays:
                    imgs.append(tf(load_pixels(fh.read(), str(f), pixels.in_chans)))
                else:
                    imgs.append(tf(decode_rgb(fh, str(f), None, set())))
        except ChannelMismatch as e:
            raise UsageError(str(e)) from None
        except Exception as e:  # a file that is not an image is named, not fatal
            print(f"skipped {f}: {type(e).__name__}: {e}", file=sys.stderr)
    return imgs


def check_output(path: str) -> None:
    """The figure's file can be written (checked before the model runs), or one line."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise UsageError(f"--output {out} is a folder: name the PNG file to write")
    if not folder.is_dir():
        raise UsageError(f"--output {out}: folder {folder} does not exist")
    existed = out.exists()
    try:  # (permissions alone do not tell: root passes them, and some folders refuse new files anyway)
        with open(out, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"--output {out} cannot be written: {e.strerror or e}") from None
    if not existed:
        out.unlink()


def main(args) -> int:
    from models.masking import draw_masks, secondary_mask
    from util.visualize import write_reconstruction
    if args.max_images < 1:
        raise UsageError(f"--max_images must be >= 1, got {args.max_images}")
    check_output(args.output)
    files = find_images(args.images, args.max_images)
    model, flags = build(args)
    from util.visualize import display_bands
    try:
        display_bands(flags.pixels.in_chans, args.vis_bands)
    except ValueError as e:
        raise UsageError(str(e)) from None
    imgs = load_images(files, flags.input_size, flags.pixels)
    if not imgs:
        raise UsageError(f"none of the {len(files)} --images could be read (each is named above)")
    imgs = torch.stack(imgs)
    contract = model.contract
    regular = contract.mask_kind == "uniform"
    gen = torch.Generator().manual_seed(args.seed)
    mask = draw_masks(len(imgs), contract.token_size, 0.75 if regular else flags.mask_ratio, regular, generator=gen,
                      rounding=contract.mask_rounding)
    sm = secondary_mask(mask, flags.vis_mask_ratio, generator=gen) if flags.vis_mask_ratio > 0 else None
    try:
        path = write_reconstruction(model, imgs, mask, sm, args.output,
                                    f"{flags.model} from {Path(args.checkpoint).name}", args.denorm,
                                    pixels=flags.pixels, bands=args.vis_bands)
    except OSError as e:
        raise UsageError(f"--output {args.output} cannot be written: {e.strerror or e}") from None
    print(f"wrote {path} ({len(imgs)} images, {flags.model}, {flags.input_size} px, denorm {args.denorm})")
    return 0


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
