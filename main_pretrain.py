"""Masked-image-modeling pretraining (UM-MAE, MAE, SimMIM, GreenMIM, MixMAE, Hiera MAE) under torchrun.

    torchrun --nproc_per_node=8 main_pretrain.py --model mae_swin_tiny_256 ...(the recipe's flags) \
        --data_path /path/to/ImageNet/ --output_dir ./work_dirs/pretrain_mae_swin_tiny_256

Without --data_path it trains on the bundled sample photographs. The recipes, with their full
commands, are in PRETRAIN.md.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

import models
from engine_pretrain import MaskSampler, pretrain_one_epoch
from util import checkpoint as ckpt_util
from util.cli import HelpFormatter, UsageError, add_common_args, check_output_dirs, finalize_common_args, run_main
from util.cpu_perf import setup_cpu_training
from util.datasets import DataError, SeededSampler, build_pretrain_dataset, image_list, report_left_out
from util.decode import DECODERS, GpuDecodeLoader, use_decoder
from util.distributed import is_main_process
from util.shards import ShardStream, shard_loader
from util.flag_checks import TRAINING_RULES, at_least, check_existing, check_ranges
from util.loop import fused_optimizer_ok, make_scaler
from util.run import Epochs, effective_lr, require_a_batch, run_epochs, start_run, wrap_for_training
from util.stop import ignore_stop_signals
from util.train_state import resume_training_state


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("UM-MAE pre-training", add_help=add_help, formatter_class=HelpFormatter)
    p.add_argument("--batch_size", default=64, type=int, help="images per GPU (effective = batch * accum * GPUs)")
    p.add_argument("--epochs", default=400, type=int, help="length of the schedule")
    p.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--model", default="mae_swin_tiny_256", type=str, help="pretraining model name")
    p.add_argument("--input_size", default=None, type=int, help="image size (default: the model's native size)")
    p.add_argument("--token_size", default=None, type=int,
                   help="mask-unit grid side = input_size / 16 (default: derived)")
    p.add_argument("--mask_ratio", default=None, type=float,
                   help="fraction of units masked (default: the method's, 0.75; MixMAE 0.5)")
    p.add_argument("--mask_regular", action="store_true", help="uniform sampling (one kept unit per 2x2 group)")
    p.add_argument("--vis_mask_ratio", default=0.0, type=float, help="secondary masking ratio (0.25 in UM-MAE)")
    p.add_argument("--norm_pix_loss", action="store_true", help="per-unit normalised pixel targets")
    p.add_argument("--reference_decoder_order", action="store_true",
                   help="reproduce the reference's decoder position order (needed for its released checkpoints)")
    p.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * eff_batch / 256)")
    p.add_argument("--blr", type=float, default=1e-3, help="base lr per 256 images")
    p.add_argument("--min_lr", type=float, default=0.0, help="lr at the end of the cosine schedule")
    p.add_argument("--warmup_epochs", type=int, default=40, help="epochs of linear lr warm-up")
    p.add_argument("--data_path", default=None, type=str,
                   help="ImageNet layout (train/<class>/*), a train.txt list, a folder of images, or tar shards "
                        "(a folder of .tar files or a .tar pattern); default: the bundled sample photos")
    p.add_argument("--load_from", default="", help="initialise the model from these weights (strict)")
    p.add_argument("--vis_freq", default=20, type=int,
                   help="also write a reconstruction figure (and TensorBoard image) every N epochs (0: end only)")
    p.add_argument("--denorm", default="neighbour", choices=["neighbour", "true"],
                   help="how figures undo norm-pix targets (see util/visualize.py)")
    p.add_argument("--channels_last", action="store_true", help="feed images in channels-last memory format")
    p.add_argument("--decode", default="pil", choices=DECODERS,
                   help="pil: PIL in the workers; fast: simplejpeg + torch's uint8 resize in the workers; gpu: "
                        "workers read bytes, the main process decodes and crops on the GPU (util/decode.py)")
    add_common_args(p)
    return p


def validate_args(args) -> None:
    """Every flag combination that cannot work fails here, before any compute (util/slurm.py calls it
    before submitting). Resolved defaults (mask ratio, sizes, image count) are written into ``args``,
    which checkpoints and run records keep."""
    check_existing(args, ["load_from"])
    check_ranges(args, TRAINING_RULES + [("vis_freq", at_least(0))])
    if args.decode == "gpu" and not str(args.device).startswith("cuda"):
        raise UsageError(f"--decode gpu decodes on a CUDA device, not --device {args.device}: use --decode fast or pil")
    pretrain_models = models.list_models(task="pretrain")
    if args.model not in pretrain_models:
        raise UsageError(f"unknown --model {args.model!r}; valid pretraining models: {', '.join(pretrain_models)}")
    for flag in ("batch_size", "epochs", "accum_iter"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0.0 <= args.vis_mask_ratio < 1.0:
        raise UsageError(f"--vis_mask_ratio must be in [0, 1), got {args.vis_mask_ratio}")
    contract = _describe(args, {})
    if args.compile and contract.compile_note:
        raise UsageError(f"--compile does not suit {args.model}: it {contract.compile_note}; drop --compile")
    if args.vis_mask_ratio > 0 and not contract.secondary_mask:
        raise UsageError(f"{args.model} has no secondary masking: use --vis_mask_ratio 0")
    if args.mask_ratio is None:
        args.mask_ratio = contract.default_mask_ratio
    if args.input_size is None:
        args.input_size = contract.input_size
    expected = contract.grid(args.input_size)
    if args.token_size is None:
        args.token_size = expected
    elif args.token_size != expected:
        raise UsageError(f"--token_size {args.token_size} does not match --input_size {args.input_size} with "
                         f"{contract.stride}-px mask units: use --token_size {expected}")
    mask_kind = contract.mask_kind
    if mask_kind == "uniform" and not args.mask_regular:
        raise UsageError(f"{args.model} needs uniform masks: add --mask_regular (valid: --mask_regular "
                         f"--mask_ratio 0.75)")
    if args.mask_regular:
        if mask_kind == "random":
            raise UsageError(f"{args.model} uses random masks: drop --mask_regular")
        if args.mask_ratio != 0.75:
            raise UsageError(f"--mask_regular keeps one unit per 2x2 group, so --mask_ratio must be 0.75 "
                             f"(got {args.mask_ratio})")
        if args.token_size % 2:
            raise UsageError(f"--mask_regular needs an even --token_size (got {args.token_size})")
    elif not 0.0 < args.mask_ratio < 1.0:
        raise UsageError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    _describe(args, model_kwargs(args, contract))  # the method's own options (e.g. mask_ratio) accepted too
    try:
        images = image_list(args.data_path, "train", labelled=False)
    except DataError as e:
        raise UsageError(str(e)) from None
    args.num_images = len(images)
    report_left_out(images)
    check_output_dirs(args)


def _describe(args, kwargs: dict) -> models.PretrainContract:
    """--model's contract, built on the meta device at --input_size; a size it cannot take is a usage error."""
    base = dict(norm_pix_loss=args.norm_pix_loss) if args.input_size is None else \
        dict(norm_pix_loss=args.norm_pix_loss, img_size=args.input_size)
    try:
        return models.describe(args.model, **{**base, **kwargs, "vis_mask_ratio": 0.0})
    except ValueError as e:
        raise UsageError(f"--input_size {args.input_size}: {e}") from None


def model_kwargs(args, contract: models.PretrainContract) -> dict:
    """The factory keywords of --model: the ones every pretraining model takes, and the options its
    contract names (``mask_ratio``: the method's default until --mask_ratio is resolved)."""
    kwargs = dict(norm_pix_loss=args.norm_pix_loss, vis_mask_ratio=args.vis_mask_ratio)
    if args.input_size is not None:
        kwargs["img_size"] = args.input_size
    if "mask_ratio" in contract.options:
        kwargs["mask_ratio"] = args.mask_ratio if args.mask_ratio is not None else contract.default_mask_ratio
    if "reference_decoder_order" in contract.options:
        kwargs["reference_decoder_order"] = args.reference_decoder_order
    return kwargs


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if argv is not None:  # called in-process (tools, tests): the run record shows these flags
        args.launch_command = [Path(__file__).name, *argv]
    finalize_common_args(args)
    validate_args(args)
    return args


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def resume(args, model, optimizer, scaler) -> tuple[int, int]:
    """Resume (explicit or automatic); otherwise optionally initialise from --load_from."""
    epoch, step, ckpt = resume_training_state(args, model, optimizer, scaler)
    if ckpt is None and args.load_from:
        model.load_state_dict(ckpt_util.unwrap_state_dict(ckpt_util.safe_load(args.load_from)), strict=True)
        print(f"initialised weights from {args.load_from}")
    return epoch, step


def figure_images(images, input_size: int) -> torch.Tensor:
    """The images every reconstruction figure of a run shows: (k <= 4, 3, S, S), normalised, on the CPU.

    Picked once at start-up from the training set's own list (``images``: the data set's ImageList or
    ShardImages), spread over it, an unreadable pick replaced by the next readable image; decoded in
    full (no reduced-scale JPEG decoding) as the PIL path would. No figure lists or reads the training
    set again, so rank 0 spends no time on it while the other ranks wait."""
    import copy
    import io

    from PIL import Image
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    from util.datasets import IMAGENET_MEAN, IMAGENET_STD
    from util.decode import Encoded
    from util.visualize import spread_indices
    full = copy.copy(images)            # the training list's own settings stay as they are
    full.min_side, full.raw = None, False
    tf = transforms.Compose([transforms.Resize(input_size, interpolation=InterpolationMode.BICUBIC),
                             transforms.CenterCrop(input_size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    picked = []
    for start in spread_indices(len(full), 4):
        for i in range(start, len(full)):
            try:
                img = full.load(i)[0]
                if isinstance(img, Encoded):
                    img = Image.open(io.BytesIO(img.data)).convert("RGB")
                picked.append(tf(img))
                break
            except Exception:
                continue
    if not picked:
        raise ValueError("no training image could be read for the reconstruction figures")
    return torch.stack(picked)


def write_figure(args, model, device, epoch: int, images: torch.Tensor, log_writer=None) -> Path:
    """The reconstruction figure of ``images`` (``figure_images``) after ``epoch``."""
    from models.masking import draw_masks, secondary_mask
    from util.visualize import caption_for, reconstruct, save_figure
    imgs = images.to(device)
    gen = torch.Generator(device=device).manual_seed(12345)  # the same masks in every figure of a run
    mask = draw_masks(len(imgs), args.token_size, args.mask_ratio, args.mask_regular, generator=gen, device=device,
                      rounding=model.contract.mask_rounding)
    sm = secondary_mask(mask, args.vis_mask_ratio, generator=gen) if args.vis_mask_ratio > 0 else None
    was_training = model.training
    model.eval()
    panels = reconstruct(model, imgs, mask, sm, denorm=args.denorm)
    model.train(was_training)
    path = save_figure(panels, Path(args.output_dir) / f"reconstruction-{epoch}.png",
                       f"{args.model}, epoch {epoch}; {caption_for(model, args.denorm)}", model.contract.stride)
    if log_writer is not None:
        import numpy as np
        from PIL import Image
        log_writer.add_image("reconstruction", np.asarray(Image.open(path).convert("RGB")), epoch,
                             dataformats="HWC")
    return path


def main(args) -> int:
    run = start_run(args, "main_pretrain")
    device, world = run.device, run.world
    dataset = build_pretrain_dataset(args)
    collate = use_decoder(dataset, args.decode, args.input_size)  # --decode fast / gpu (util/decode.py)
    workers = args.num_workers
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=workers, pin_memory=args.pin_mem and device.type == "cuda",
                         drop_last=True, persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
                         collate_fn=collate)
    if isinstance(dataset, ShardStream):  # tar shards: the stream splits, shuffles and batches (util/shards.py)
        sampler, loader = dataset, shard_loader(dataset, workers, loader_kwargs["pin_memory"], ignore_stop_signals)
    else:
        sampler = SeededSampler(dataset, world, run.rank, seed=args.seed)
        loader = DataLoader(dataset, sampler=sampler, **loader_kwargs)
    if args.decode == "gpu":
        loader = GpuDecodeLoader(loader, args.input_size, device)
    steps_per_epoch = len(loader)
    require_a_batch(steps_per_epoch, len(dataset), args, world)
    figures = figure_images(dataset.images, args.input_size) if is_main_process() else None

    model = models.create_model(args.model, **model_kwargs(args, models.describe(args.model))).to(device)
    contract = model.contract
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cpu_note = setup_cpu_training(model, device, args.cpu_matmul, compiled=args.compile, malloc=args.cpu_tuning)
    eff_batch = args.batch_size * args.accum_iter * world
    args.lr = effective_lr(args, world)
    from timm.optim import param_groups_weight_decay
    # The reference decays every >1-D tensor in pretraining (tokens included); a method may say otherwise.
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=contract.no_weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused_optimizer_ok(device) or None)
    scaler = make_scaler(args.amp, device)
    start_epoch, start_step = resume(args, model, optimizer, scaler)
    run.record.note(start={"epoch": start_epoch, "step": start_step}, lr=args.lr, effective_batch=eff_batch,
                    steps_per_epoch=steps_per_epoch, num_images=len(dataset), cpu=cpu_note or None)
    train_model = wrap_for_training(model, args, device)
    masks = MaskSampler(args.token_size, args.mask_ratio, args.mask_regular, args.vis_mask_ratio,
                        seed=args.seed, device=device, rounding=contract.mask_rounding)
    if is_main_process():
        print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
              f"{args.num_images} images, {steps_per_epoch} steps/epoch; effective batch {eff_batch}, "
              f"lr {args.lr:.3e} (blr {args.lr * 256 / eff_batch:.3e}); amp {args.amp}; device {device}; "
              f"world {world}", flush=True)
        if cpu_note:
            print(cpu_note, flush=True)
    run.open_log_writer()
    epochs = PretrainEpochs(run, model, train_model, loader, optimizer, scaler, masks, start_epoch, figures)
    return run_epochs(run, epochs, model, optimizer, scaler, sampler, start_epoch, start_step)


class PretrainEpochs(Epochs):
    """Pretraining's part of the epoch loop (util.run): the masked-image-modeling epoch, its
    TensorBoard scalars, reconstruction figures and summary."""

    def __init__(self, run, model, train_model, loader, optimizer, scaler, masks, start_epoch: int,
                 figures: Optional[torch.Tensor] = None) -> None:
        super().__init__(run, start_epoch)
        self.model, self.train_model, self.figures = model, train_model, figures
        self.loader, self.optimizer, self.scaler, self.masks = loader, optimizer, scaler, masks
        self.stats = {}

    def train(self, epoch: int, start_step: int) -> dict:
        self.masks.set_epoch(epoch, start_step, self.args.batch_size)
        self.stats = pretrain_one_epoch(self.train_model, self.loader, self.optimizer, self.scaler, self.run.device,
                                        epoch, self.args, self.masks, log_writer=self.run.log_writer,
                                        stop_flag=self.run.stop, start_step=start_step)
        return self.stats

    def log(self, epoch: int, stats: dict, last: bool) -> None:
        writer, args = self.run.log_writer, self.args
        if args.vis_freq > 0 and (epoch + 1) % args.vis_freq == 0 and not last:
            write_figure(args, self.model, self.run.device, epoch, self.figures, writer)

    def complete(self) -> None:
        args = self.args
        print(f"rank {self.run.rank}: final weights digest {weights_digest(self.model)}", flush=True)
        if not is_main_process():
            return
        print(f"training time {datetime.timedelta(seconds=int(time.time() - self.run.start_time))}", flush=True)
        figure = None
        if self.start_epoch < args.epochs or not (Path(args.output_dir) / f"reconstruction-{args.epochs - 1}.png").exists():
            figure = write_figure(args, self.model, self.run.device, args.epochs - 1, self.figures,
                                  self.run.log_writer)
            print(f"reconstruction figure: {figure.resolve()}", flush=True)
        self.run.close_log_writer()
        self.finish("completed", args.epochs - 1, figure=str(figure.resolve()) if figure else None)

    def finish(self, status: str, last_epoch: int, **extra) -> None:
        stats, parts = self.stats, []
        if stats:
            reserved = (f" (reserved {stats['peak_reserved_mb']:.0f} MB)"
                        if self.run.device.type == "cuda" and "peak_reserved_mb" in stats else "")
            parts.append(f"final loss {stats['loss']:.4f}, {stats['images_per_sec']:.1f} img/s, "
                         f"peak mem {stats['peak_mem_mb']:.0f} MB{reserved}")
        self.run.finish(self.args.model + " pretraining", status, self.start_epoch, last_epoch, parts,
                        final=stats or None, **{k: v for k, v in extra.items() if v is not None})


_validate = validate_args  # the former private name


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
