"""Masked-image-modeling pretraining (UM-MAE, MAE, SimMIM, GreenMIM, MixMAE, Hiera MAE) under torchrun.

    torchrun --nproc_per_node=8 main_pretrain.py --config recipes/pretrain_ummae_swin_tiny_256.yaml \
        --data_path /path/to/ImageNet/ --output_dir ./work_dirs/pretrain_mae_swin_tiny_256

Without --data_path it trains on the bundled sample photographs. The recipes are in recipes/ and
PRETRAIN.md; every flag of theirs can also be given on the command line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from config.cli import ArgumentParser, HelpFormatter, add_common_args, answer_usage_first
from config.pixel_flags import add_pixel_args
from imagedata import DECODERS

__all__ = ["effective_lr", "get_args_parser", "main", "parse_args"]

MONITOR_FREQ = 10  # the default --monitor_freq (PRETRAIN.md: its cost at the recipes' sizes)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser("UM-MAE pre-training", add_help=add_help, formatter_class=HelpFormatter)
    p.add_argument("--batch_size", default=64, type=int, help="images per GPU (effective = batch * accum * GPUs)")
    p.add_argument("--epochs", default=400, type=int, help="length of the schedule")
    p.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--model", default="mae_swin_tiny_256", type=str, help="pretraining model name")
    p.add_argument("--input_size", default=None, type=int, help="image size (default: the model's native size)")
    p.add_argument("--token_size", default=None, type=int,
                   help="mask-unit grid side = input_size / 16 (default: derived)")
    p.add_argument("--mask_ratio", default=None, type=float,
                   help="fraction of units masked (default: the method's, 0.75; MixMAE 0.5)")
    p.add_argument("--mask_regular", action="store_true",
                   help="uniform sampling (one kept unit per 2x2 group; implied by a model that takes no other)")
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
                        "workers read bytes, the main process decodes and crops on the GPU (imagedata/decode.py)")
    add_pixel_args(p)  # --in_chans, --norm_stats (config/pixel_flags.py)
    # --- monitoring (engine/monitor.py) ---
    p.add_argument("--monitor_data", default="", type=str,
                   help="labelled images (train/ and val/ class folders, lists or labelled shards, or one folder "
                        "of class folders, split once by --seed) on which k-NN and a linear probe of the encoder "
                        "are measured every --monitor_freq epochs and at the end (default: no monitor)")
    p.add_argument("--monitor_freq", default=MONITOR_FREQ, type=int,
                   help="epochs between feature monitors (the last epoch always has one)")
    p.add_argument("--save_best_monitor", action="store_true",
                   help="keep checkpoint-best.pth at the best monitor k-NN top-1")
    p.add_argument("--on_nonfinite", default="stop", choices=["stop", "rollback"],
                   help="after a non-finite loss: stop (the last good checkpoint stays), or roll the epoch back to "
                        "its start and train it again without the offending micro-steps")
    p.add_argument("--max_rollbacks", default=3, type=int,
                   help="--on_nonfinite rollback: rollbacks a run may take; then it stops as with stop")
    p.add_argument("--rollback_lr_scale", default=1.0, type=float,
                   help="--on_nonfinite rollback: multiply the lr by this (0 < F <= 1) for --rollback_lr_window "
                        "optimizer steps from the point rolled back to (default 1: unchanged)")
    p.add_argument("--rollback_lr_window", default=0, type=int,
                   help="--on_nonfinite rollback: optimizer steps of the lowered lr after a rollback (default 0: none)")
    add_common_args(p)
    return p


# --help and flag errors answer before torch, torchvision and timm load (also for submitit_pretrain.py)
answer_usage_first(get_args_parser, __name__ == "__main__")

from dataclasses import replace  # noqa: E402
import torch  # noqa: E402
from timm.optim import param_groups_weight_decay  # noqa: E402
import models  # noqa: E402
from config.cli import parse, run_main, write_recipe  # noqa: E402
from config.pretrain import PretrainConfig, check_flags, model_kwargs, resolve, unknown_model  # noqa: E402
from config.sections import effective_lr, step_settings  # noqa: E402
from engine.cpu_perf import setup_cpu_training  # noqa: E402
from engine.distributed import is_main_process  # noqa: E402
from engine.loaders import train_loader  # noqa: E402
from engine.monitor import FeatureMonitor, monitor_datasets  # noqa: E402
from engine.optim import make_adamw  # noqa: E402
from engine.run import start_run, wrap_for_training  # noqa: E402
from engine.schedule import CosineSchedule  # noqa: E402
from engine.state import RunFlags, TrainState  # noqa: E402
from engine.step import make_scaler  # noqa: E402
from engine.trainer import Cadence, Periods, Recovery, Trainer, require_a_batch  # noqa: E402
from engine.record import CostMeter, device_peak, flops_text  # noqa: E402
from engine_pretrain import PretrainTask, train_flops_per_image  # noqa: E402
from errors import DataError, UsageError  # noqa: E402
from imagedata.datasets import build_pretrain_dataset, data_fingerprint, image_list, report_left_out  # noqa: E402
from imagedata.channels import check_channels  # noqa: E402
from imagedata.decode import GpuDecodeLoader, use_decoder  # noqa: E402
from imagedata.normstats import describe as describe_pixels  # noqa: E402
from imagedata.normstats import run_pixels  # noqa: E402
from util.pretrained import load_pretraining_weights  # noqa: E402
from util.visualize import figure_images  # noqa: E402


def parse_args(argv=None) -> PretrainConfig:
    """Flags -> config: every flag combination that cannot work fails here, before any compute (and
    before launch.slurm submits a job)."""
    return configure(parse(get_args_parser(), argv, Path(__file__).name))


def configure(flags: argparse.Namespace) -> PretrainConfig:
    """The config of parsed flags (the model described once, on the meta device; the data listed)."""
    check_flags(flags)
    if flags.model not in models.list_models(task="pretrain"):
        raise UsageError(unknown_model(flags.model))
    options = models.describe_class(flags.model).build_options
    note = models.describe_class(flags.model).compile_note
    if flags.compile and note:
        raise UsageError(f"--compile does not suit {flags.model}: it {note}; drop --compile")
    try:
        contract = models.describe(flags.model, **{**model_kwargs(flags, options), "vis_mask_ratio": 0.0})
    except ValueError as e:
        raise UsageError(f"--input_size {flags.input_size}: {e}") from None
    try:
        images = image_list(flags.data_path, "train", labelled=False)
        check_channels(images, flags.in_chans)  # the data's channels against --in_chans
    except DataError as e:
        raise UsageError(str(e)) from None
    report_left_out(images)
    if flags.monitor_data:  # a monitor set that cannot be read fails here, before any compute
        monitor_datasets(flags.monitor_data, contract.input_size, flags.batch_size, flags.seed)
    return resolve(flags, contract, len(images))


def main(config: PretrainConfig) -> int:
    run, config = start_run(config, "main_pretrain")
    config = replace(config, lr=effective_lr(config, run.world))
    # --in_chans / --norm_stats: the statistics (auto: computed once, cached in --output_dir) join the config,
    # so checkpoints, config.yaml and the run record keep them (imagedata/normstats.py)
    pixels = run_pixels(config, lambda: image_list(config.data_path, "train", labelled=False),
                        log=print if is_main_process() else lambda *a: None)
    config = replace(config, norm_mean=pixels.mean, norm_std=pixels.std)
    run.log(f"pixels: {describe_pixels(pixels)} (--norm_stats {config.norm_stats})")
    dataset = build_pretrain_dataset(config.data_path, config.input_size, config.batch_size, config.seed, run.world,
                                     run.rank, pixels)
    collate = use_decoder(dataset, config.decode, config.input_size)  # --decode fast / gpu (imagedata/decode.py)
    wrap = (lambda loader: GpuDecodeLoader(loader, config.input_size, run.device)) if config.decode == "gpu" else None
    loader = train_loader(dataset, config.batch_size, run.world, run.rank, config.seed, config.num_workers,
                          run.device, config.pin_mem, collate=collate, wrap=wrap)
    require_a_batch(len(loader), len(dataset), config.batch_size, run.world)
    figures = figure_images(dataset.images, config.input_size, pixels) if is_main_process() else None

    model = models.create_model(config.model, **config.model_kwargs(models.describe_class(config.model).build_options))
    model = model.to(run.device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format)
    flops_per_image = train_flops_per_image(model, config)   # counted once, on a copy (before CPU kernels swap)
    cpu_note = setup_cpu_training(model, run.device, config.cpu_matmul, compiled=config.compile,
                                  malloc=config.cpu_tuning)
    run.log(cpu_note)
    # The reference decays every >1-D tensor in pretraining (tokens included); a method may say otherwise.
    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=model.contract.no_weight_decay)
    optimizer = make_adamw(groups, config.lr, run.device, betas=(0.9, 0.95))
    state = TrainState(RunFlags.of(config), model, optimizer, make_scaler(config.amp, run.device),
                       data=data_fingerprint(dataset), best_key=PretrainTask.best_key if config.save_best_monitor else "")
    if state.resume() is None and config.load_from:
        print(f"initialised weights: {load_pretraining_weights(model, config.load_from).summary()}")
    state.train_model = wrap_for_training(model, run, config.compile)
    eff_batch = config.batch_size * config.accum_iter * run.world
    peak, peak_source = device_peak(run.device, config.amp)
    cost = CostMeter(flops_per_image, sum(p.numel() for p in model.parameters()), peak, peak_source, run.world,
                     len(loader) * config.batch_size * run.world, config.epochs)
    run.note(f"cost: {flops_per_image / 1e9:.3f} GFLOPs per training image (forward + backward, torch's flop "
             f"counter); peak {flops_text(peak) if peak else 'unknown'} per device ({peak_source})",
             cost=cost.start())
    run.note(f"{config.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {config.num_images} "
             f"images, {len(loader)} steps/epoch; effective batch {eff_batch}, lr {config.lr:.3e} (blr "
             f"{config.lr * 256 / eff_batch:.3e}); amp {config.amp}; device {run.device}; world {run.world}",
             cpu=cpu_note or None, start={"epoch": state.epoch, "step": state.step}, lr=config.lr, effective_batch=eff_batch,
             steps_per_epoch=len(loader), num_images=len(dataset), in_chans=pixels.in_chans,
             norm_mean=list(pixels.mean), norm_std=list(pixels.std))
    write_recipe(config, run.rank)
    monitor = FeatureMonitor(model, config.model, config.monitor_data, config.input_size, config.batch_size,
                             config.seed, config.num_workers, run.device, run.world, run.rank, config.amp,
                             config.pin_mem) if config.monitor_data else None
    task = PretrainTask(config, model, state.train_model, run, figures, monitor, cost)
    periods = Periods(len(loader), len(loader) * config.epochs)
    schedule = CosineSchedule(config.lr, config.min_lr, config.warmup_epochs, config.epochs)
    return Trainer(run, state, task, loader, schedule, periods, step_settings(config),
                   evaluate=Cadence(config.monitor_freq * len(loader)), save=Cadence(config.save_freq * len(loader)),
                   exit_after=config.exit_after_epoch,
                   recovery=Recovery(config.max_rollbacks, config.rollback_lr_scale, config.rollback_lr_window)
                   if config.on_nonfinite == "rollback" else None).fit()


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
