"""Masked-image-modeling pretraining (UM-MAE, MAE, SimMIM) under torchrun.

    torchrun --nproc_per_node=8 main_pretrain.py --batch_size 128 --accum_iter 4 \
        --model mae_swin_tiny_256 --mask_regular --vis_mask_ratio 0.25 --input_size 256 --token_size 16 \
        --norm_pix_loss --mask_ratio 0.75 --epochs 200 --warmup_epochs 10 --blr 1.5e-4 --weight_decay 0.05 \
        --data_path /path/to/ImageNet/ --output_dir ./work_dirs/pretrain_mae_swin_tiny_256 --log_dir ...

Without --data_path it trains on the bundled sample photographs. See PRETRAIN.md.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import models
from engine_pretrain import MaskSampler, pretrain_one_epoch
from util import checkpoint as ckpt_util
from util.cli import (HelpFormatter, UsageError, add_common_args, check_output_dir, finalize_common_args,
                      ignore_stop_signals, run_main, setup_stop_signals)
from util.cpu_perf import setup_cpu_training
from util.datasets import DataError, build_pretrain_dataset, image_list, report_left_out
from util.decode import DECODERS, GpuDecodeLoader, use_decoder
from util.shards import ShardStream, shard_loader
from util.flag_checks import TRAINING_RULES, at_least, check_existing, check_ranges
from util.distributed import cleanup, default_num_workers, get_rank, get_world_size, init_distributed, is_main_process
from util.loop import (NonFiniteLossError, StopRequested, fused_optimizer_ok, make_scaler, resolve_amp,
                       seed_rngs)
from util.run_record import RunClock, RunRecord, summary_line
from util.train_state import finish_interrupted, resume_training_state, save_training_state


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


def _validate(args) -> None:
    """Every flag combination that cannot work fails here, before any compute."""
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
    kwargs = model_kwargs(args)
    try:
        with torch.device("meta"):
            meta = models.create_model(args.model, **{**kwargs, "vis_mask_ratio": 0.0})
    except ValueError as e:
        raise UsageError(f"--input_size {args.input_size}: {e}") from None
    if args.vis_mask_ratio > 0 and not getattr(meta, "supports_secondary_mask", True):
        raise UsageError(f"{args.model} has no secondary masking: use --vis_mask_ratio 0")
    if args.mask_ratio is None:
        args.mask_ratio = getattr(meta, "default_mask_ratio", 0.75)
    if args.input_size is None:
        args.input_size = meta.token_size * meta.stride
    expected = args.input_size // meta.stride
    if args.token_size is None:
        args.token_size = expected
    elif args.token_size != expected:
        raise UsageError(f"--token_size {args.token_size} does not match --input_size {args.input_size} with "
                         f"{meta.stride}-px mask units: use --token_size {expected}")
    mask_kind = getattr(meta, "mask_kind", "any")
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
    try:
        images = image_list(args.data_path, "train", labelled=False)
    except DataError as e:
        raise UsageError(str(e)) from None
    args.num_images = len(images)
    report_left_out(images)
    check_output_dir(args.output_dir)
    if args.log_dir:
        check_output_dir(args.log_dir)


def model_kwargs(args) -> dict:
    kwargs = dict(norm_pix_loss=args.norm_pix_loss, vis_mask_ratio=args.vis_mask_ratio)
    if args.input_size is not None:
        kwargs["img_size"] = args.input_size
    if args.model.startswith("mae_hiera_"):  # Hiera MAE: the model's own default (0.6) until _validate sets it
        if args.mask_ratio is not None:
            kwargs["mask_ratio"] = args.mask_ratio
    elif args.model.startswith(("mae_vit", "greenmim_")):
        kwargs["mask_ratio"] = args.mask_ratio if args.mask_ratio is not None else 0.75
    elif args.model.startswith("mae_"):
        kwargs["reference_decoder_order"] = args.reference_decoder_order
    return kwargs


def effective_lr(args, world_size: int) -> float:
    """lr = blr * batch_size * accum_iter * world_size / 256 unless --lr is given."""
    if args.lr is not None:
        return args.lr
    return args.blr * args.batch_size * args.accum_iter * world_size / 256


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if argv is not None:  # called in-process (tools, tests): the run record shows these flags
        args.launch_command = [Path(__file__).name, *argv]
    finalize_common_args(args)
    _validate(args)
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


def write_figure(args, model, device, epoch: int, log_writer=None) -> Path:
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    from util.datasets import IMAGENET_MEAN, IMAGENET_STD
    from util.visualize import caption_for, reconstruct, save_figure
    images = image_list(args.data_path, "train", labelled=False)
    tf = transforms.Compose([transforms.Resize(args.input_size, interpolation=InterpolationMode.BICUBIC),
                             transforms.CenterCrop(args.input_size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    from util.visualize import spread_indices
    picked = []
    # spread over the (class-sorted) list; unreadable picks are replaced by the next readable image
    for start in spread_indices(len(images), 4):
        for i in range(start, len(images)):
            try:
                picked.append(tf(images.load(i)[0]))
                break
            except Exception:
                continue
    imgs = torch.stack(picked).to(device)
    from models.masking import draw_masks, secondary_mask
    gen = torch.Generator(device=device).manual_seed(12345)  # the same masks in every figure of a run
    mask = draw_masks(len(imgs), args.token_size, args.mask_ratio, args.mask_regular, generator=gen, device=device,
                      rounding=getattr(model, "mask_rounding", "keep"))
    sm = secondary_mask(mask, args.vis_mask_ratio, generator=gen) if args.vis_mask_ratio > 0 else None
    was_training = model.training
    model.eval()
    panels = reconstruct(model, imgs, mask, sm, denorm=args.denorm)
    model.train(was_training)
    path = save_figure(panels, Path(args.output_dir) / f"reconstruction-{epoch}.png",
                       f"{args.model}, epoch {epoch}; {caption_for(model, args.denorm)}", model.stride)
    if log_writer is not None:
        import numpy as np
        from PIL import Image
        log_writer.add_image("reconstruction", np.asarray(Image.open(path).convert("RGB")), epoch,
                             dataformats="HWC")
    return path


def main(args) -> int:
    stop = setup_stop_signals(getattr(args, "extra_stop_signals", ()))  # first: a stop during start-up counts
    init_distributed(args)
    device = torch.device(args.device)
    rank, world = get_rank(), get_world_size()
    args.amp = resolve_amp(args.amp, device)
    seed_rngs(args.seed, rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.num_workers is None:
        args.num_workers = default_num_workers(device)
    run_record = RunRecord.start(args, "main_pretrain", device)

    dataset = build_pretrain_dataset(args)
    collate = use_decoder(dataset, args.decode, args.input_size)  # --decode fast / gpu (util/decode.py)
    from util.datasets import SeededSampler
    workers = args.num_workers
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=workers, pin_memory=args.pin_mem and device.type == "cuda",
                         drop_last=True, persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
                         collate_fn=collate)
    if isinstance(dataset, ShardStream):  # tar shards: the stream splits, shuffles and batches (util/shards.py)
        sampler, loader = dataset, shard_loader(dataset, workers, loader_kwargs["pin_memory"], ignore_stop_signals)
    else:
        sampler = SeededSampler(dataset, world, rank, seed=args.seed)
        loader = DataLoader(dataset, sampler=sampler, **loader_kwargs)
    if args.decode == "gpu":
        loader = GpuDecodeLoader(loader, args.input_size, device)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UsageError(f"{len(dataset)} training images are fewer than one global batch "
                         f"({args.batch_size} x {world} GPUs): lower --batch_size")

    model = models.create_model(args.model, **model_kwargs(args)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cpu_note = setup_cpu_training(model, device, args.cpu_matmul, compiled=args.compile, malloc=args.cpu_tuning)
    eff_batch = args.batch_size * args.accum_iter * world
    args.lr = effective_lr(args, world)
    from timm.optim import param_groups_weight_decay
    # The reference decays every >1-D tensor in pretraining (tokens included); a method may say otherwise.
    no_decay = model.no_weight_decay_pretrain() if hasattr(model, "no_weight_decay_pretrain") else ()
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=no_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused_optimizer_ok(device) or None)
    scaler = make_scaler(args.amp, device)
    start_epoch, start_step = resume(args, model, optimizer, scaler)
    run_record.note(start={"epoch": start_epoch, "step": start_step}, lr=args.lr, effective_batch=eff_batch,
                steps_per_epoch=steps_per_epoch, num_images=len(dataset), cpu=cpu_note or None)

    train_model = model
    if args.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    masks = MaskSampler(args.token_size, args.mask_ratio, args.mask_regular, args.vis_mask_ratio,
                        seed=args.seed, device=device, rounding=getattr(model, "mask_rounding", "keep"))

    log_writer = None
    if is_main_process():
        print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
              f"{args.num_images} images, {steps_per_epoch} steps/epoch; effective batch {eff_batch}, "
              f"lr {args.lr:.3e} (blr {args.lr * 256 / eff_batch:.3e}); amp {args.amp}; device {device}; "
              f"world {world}", flush=True)
        if cpu_note:
            print(cpu_note, flush=True)
        if args.log_dir:
            from torch.utils.tensorboard import SummaryWriter
            log_writer = SummaryWriter(log_dir=args.log_dir)

    start_time = time.time()
    clock = RunClock(start_epoch, args.epochs)
    epoch = start_epoch
    stats = {}
    try:
        for epoch in range(start_epoch, args.epochs):
            step0 = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch)
            sampler.skip = step0 * args.batch_size
            masks.set_epoch(epoch, step0, args.batch_size)
            stats = pretrain_one_epoch(train_model, loader, optimizer, scaler, device, epoch, args, masks,
                                       log_writer=log_writer, stop_flag=stop, start_step=step0)
            last = epoch + 1 == args.epochs
            numbered = last or (args.save_freq > 0 and (epoch + 1) % args.save_freq == 0)
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
            save_training_state(args, epoch, model, optimizer, scaler, numbered=numbered, log_record=record)
            if is_main_process():
                if log_writer is not None:
                    log_writer.add_scalar("epoch/loss", stats["loss"], epoch)
                    log_writer.add_scalar("epoch/images_per_sec", stats["images_per_sec"], epoch)
                    log_writer.add_scalar("epoch/peak_mem_mb", stats["peak_mem_mb"], epoch)
                    log_writer.flush()
                if stats.get("skipped_images"):
                    print(f"warning: {stats['skipped_images']} unreadable images skipped in epoch {epoch} "
                          f"(all ranks)")
                if args.vis_freq > 0 and (epoch + 1) % args.vis_freq == 0 and not last:
                    write_figure(args, model, device, epoch, log_writer)
                print(clock.line(epoch), flush=True)
            if epoch == args.exit_after_epoch and not last:
                if is_main_process():
                    print(f"--exit_after_epoch {epoch}: checkpoint written; exiting", flush=True)
                _finish(args, run_record, "exited after epoch", start_time, start_epoch, epoch, stats)
                cleanup()
                return 0
    except (StopRequested, NonFiniteLossError) as e:
        code = finish_interrupted(e, args, model, optimizer, scaler, stop, extra=None)
        _finish(args, run_record, "stopped" if isinstance(e, StopRequested) else "failed", start_time, start_epoch,
                e.epoch - 1, stats, reason=str(e))
        return code

    print(f"rank {rank}: final weights digest {weights_digest(model)}", flush=True)
    if is_main_process():
        total = datetime.timedelta(seconds=int(time.time() - start_time))
        print(f"training time {total}", flush=True)
        figure = None
        if start_epoch < args.epochs or not (Path(args.output_dir) / f"reconstruction-{args.epochs - 1}.png").exists():
            figure = write_figure(args, model, device, args.epochs - 1, log_writer)
            print(f"reconstruction figure: {figure.resolve()}", flush=True)
        if log_writer is not None:
            log_writer.close()
        _finish(args, run_record, "completed", start_time, start_epoch, args.epochs - 1, stats,
                figure=str(figure.resolve()) if figure else None)
    cleanup()
    return 0


def _finish(args, record: RunRecord, status: str, start_time: float, start_epoch: int, last_epoch: int,
            stats: dict, **extra) -> None:
    """The run record's end and the one-line summary (rank 0)."""
    if not is_main_process():
        return
    wall = time.time() - start_time
    ran = max(0, last_epoch + 1 - start_epoch)
    parts = [f"epochs {start_epoch}-{last_epoch} of {args.epochs} ({ran} in this run)" if ran else
             f"no epoch to run ({args.epochs} done)"]
    if stats:
        parts.append(f"final loss {stats['loss']:.4f}, {stats['images_per_sec']:.1f} img/s, "
                     f"peak mem {stats['peak_mem_mb']:.0f} MB")
    print(summary_line(args.model + " pretraining", status, wall, parts, args.output_dir), flush=True)
    record.finish(status, epochs_run=ran, last_epoch=last_epoch, final=stats or None,
                  **{k: v for k, v in extra.items() if v is not None})


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
