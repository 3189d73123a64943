"""Semantic segmentation (ADE20K): UperNet + FCN auxiliary head on our Swin / PVT backbones, under torchrun.

    torchrun --nproc_per_node=8 main_segmentation.py --config recipes/segmentation_upernet_swin_tiny.yaml \
        --finetune ./work_dirs/finetune_mae_swin_tiny_256/checkpoint-99.pth \
        --data_path /path/to/ADEChallengeData2016 --output_dir ./work_dirs/seg_swin_tiny --log_dir ...

Every flag defaults to the reference's recipe (SEGMENTATION.md, "What each flag does"). Training
counts iterations: the run's periods are evaluation intervals (``--eval_interval`` iterations),
and checkpoints record the interval and the iteration in it. ``--eval`` evaluates the weights only.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from config.cli import ArgumentParser, HelpFormatter, add_common_args, answer_usage_first

TEST_MODES = ("slide", "whole", "both")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser("UM-MAE semantic segmentation (UperNet)", add_help=add_help, formatter_class=HelpFormatter)
    p.add_argument("--batch_size", default=2, type=int, help="images per GPU (reference: 2 x 8 GPUs)")
    p.add_argument("--iters", default=160_000, type=int, help="training iterations (optimizer steps x accum_iter)")
    p.add_argument("--accum_iter", default=1, type=int)
    p.add_argument("--model", default="swin_tiny_256", type=str, help="backbone: a classifier name")
    p.add_argument("--input_size", default=512, type=int, help="training crop (and sliding window) size")
    p.add_argument("--drop_path", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-4, help="absolute learning rate (not scaled by batch)")
    p.add_argument("--opt_betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--layer_decay", type=float, default=1.0, help="layer-wise lr decay (reference: 1.0 = none)")
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--power", type=float, default=1.0, help="poly schedule power")
    p.add_argument("--warmup_iters", type=int, default=1500)
    p.add_argument("--warmup_ratio", type=float, default=1e-6, help="lr at iteration 0, as a fraction")
    p.add_argument("--img_scale", type=int, nargs=2, default=(2048, 512), help="resize target (long, short)")
    p.add_argument("--ratio_range", type=float, nargs=2, default=(0.5, 2.0), help="training resize ratio range")
    p.add_argument("--cat_max_ratio", type=float, default=0.75, help="crop redraw threshold (1 disables)")
    p.add_argument("--no_photometric", action="store_false", dest="photometric",
                   help="skip the photometric distortion")
    p.add_argument("--reduce_zero_label", action="store_true", default=True,
                   help="label 0 ignored, the rest minus one (ADE20K; default on)")
    p.add_argument("--no_reduce_zero_label", action="store_false", dest="reduce_zero_label")
    p.add_argument("--channels", type=int, default=768, help="adapter and UperNet width")
    p.add_argument("--aux_channels", type=int, default=256)
    p.add_argument("--aux_weight", type=float, default=0.4, help="FCN auxiliary loss weight (0: no aux head)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--avg_non_ignore", action="store_true",
                   help="average the loss over labelled pixels only (mmseg 0.11 averages over all pixels)")
    p.add_argument("--test_mode", default="slide", choices=TEST_MODES, help="evaluation inference")
    p.add_argument("--test_stride", type=int, default=341, help="sliding-window stride")
    p.add_argument("--eval_interval", type=int, default=16_000, help="evaluate and checkpoint every N iterations")
    p.add_argument("--finetune", default="", help="backbone weights (the reference uses the ImageNet-finetuned "
                                                  "classifier checkpoint)")
    p.add_argument("--nb_classes", default=150, type=int,
                   help="classes after --reduce_zero_label (ADE20K: 150; the toy set of segmentation.toy: 4); "
                        "checked against the first label maps at start-up")
    p.add_argument("--data_path", default=None, type=str,
                   help="ADE20K layout: images/{training,validation}, annotations/{training,validation}")
    p.add_argument("--eval", action="store_true",
                   help="evaluate the weights of --resume (a checkpoint of this program, e.g. "
                        "OUTPUT_DIR/checkpoint-best.pth) only; its backbone, heads and test settings are used unless "
                        "given")
    p.add_argument("--random_weights", action="store_true",
                   help="with --eval: evaluate untrained heads on purpose (a baseline); --eval refuses it otherwise")
    # an evaluation interval is this program's period (what the others call an epoch)
    add_common_args(p, save_help="write checkpoint-{interval}.pth every N evaluation intervals",
                    exit_help="finish this evaluation interval (counted from 0), checkpoint and exit")
    p.set_defaults(save_freq=1, num_workers=4)  # (the reference's workers per GPU, not the automatic rule)
    next(a for a in p._actions if a.dest == "num_workers").help = "DataLoader worker processes per rank"
    return p


# --help and flag errors answer before torch, torchvision and timm load
answer_usage_first(get_args_parser, __name__ == "__main__")

import os  # noqa: E402
import sys  # noqa: E402
import torch  # noqa: E402
from config.cli import (check_task_checkpoint, dense_backbone, parse, run_main, weights_to_evaluate,  # noqa: E402
                        write_recipe)
from config.rules import Problems  # noqa: E402
from config.sections import step_settings  # noqa: E402
from config.segmentation import ARCHITECTURE, EVAL_SETTINGS, MARKER, SegmentConfig, resolve  # noqa: E402
from engine.cpu_perf import setup_cpu_training  # noqa: E402
from engine.distributed import is_main_process  # noqa: E402
from engine.evaluate import load_trained_weights  # noqa: E402
from engine.loaders import eval_loader, train_loader  # noqa: E402
from engine.optim import dense_param_groups, make_adamw  # noqa: E402
from engine.run import Run, start_run, wrap_for_training  # noqa: E402
from engine.schedule import PolySchedule  # noqa: E402
from engine.state import RunFlags, TrainState  # noqa: E402
from engine.step import make_scaler  # noqa: E402
from engine.trainer import Cadence, Periods, Trainer, evaluate_only  # noqa: E402
from engine_segmentation import SegmentTask  # noqa: E402
from errors import DataError, UsageError  # noqa: E402
from models.dense import dense_models  # noqa: E402
from segmentation.data import IterationSampler, SegmentationDataset, TrainTransform, find_pairs, label_range  # noqa: E402
from segmentation.heads import SegmentationModel  # noqa: E402
from segmentation.metrics import class_names_for  # noqa: E402
from util.pretrained import build_backbone  # noqa: E402


def parse_args(argv=None, defaults: dict | None = None) -> SegmentConfig:
    """Flags -> config: every flag combination that cannot work fails here, before any compute (and
    before launch.slurm submits a job)."""
    return configure(parse(get_args_parser(), argv, Path(__file__).name, defaults,
                           architecture=ARCHITECTURE + EVAL_SETTINGS, marker=MARKER))


def configure(flags: argparse.Namespace) -> SegmentConfig:
    """The config of parsed flags (the model described once, on the meta device; the data listed and
    its first label maps read against --nb_classes). Every problem found is named in one UsageError."""
    problems = Problems()
    contract, problem = dense_backbone(flags.model, flags.input_size)
    problems.add(problem)
    if flags.data_path is None:
        problems.add("--data_path is required: a folder in ADE20K layout (images/, annotations/)")
    else:
        try:  # the layout and the pairing by name; main reads the sizes once
            needs = ("val",) if flags.eval else ("train", "val")
            val = find_pairs(flags.data_path, "val", check_sizes=False, needs=needs)
            if not flags.eval:
                find_pairs(flags.data_path, "train", check_sizes=False)
            problems.add(check_labels(val, flags))
        except DataError as e:
            problems.add(str(e))
    for problem in check_task_checkpoint(flags, MARKER, "main_segmentation.py", "segmentation heads", ARCHITECTURE):
        problems.add(problem)
    config = None
    with problems.check():
        config = resolve(flags, contract, dense_models)
    problems.raise_any()
    return config


def check_labels(val, flags: argparse.Namespace) -> str:
    """The first validation label maps against --nb_classes: a class beyond it is a problem (returned);
    far fewer classes than it (the toy set's 4 trained as ADE20K's 150) a warning."""
    top, read = label_range(val, flags.reduce_zero_label)
    if top is None:
        return ""
    zero = " after --reduce_zero_label (raw value - 1; 0 is ignored)" if flags.reduce_zero_label else ""
    if top >= flags.nb_classes:
        return (f"--nb_classes {flags.nb_classes}, but the label maps hold class {top}{zero} (in the first {read} "
                f"validation maps): use --nb_classes {top + 1} or more")
    if top + 1 <= flags.nb_classes // 2 and os.environ.get("RANK", "0") == "0":
        print(f"warning: the first {read} validation label maps use classes 0..{top}{zero}, but --nb_classes is "
              f"{flags.nb_classes}: if the data set has {top + 1} classes, pass --nb_classes {top + 1} (mIoU "
              f"averages over the classes present)", file=sys.stderr, flush=True)
    return ""


def report_skipped(split: str, pairs, limit: int = 10) -> None:
    if pairs.skipped and is_main_process():
        print(f"{split}: skipped {len(pairs.skipped)} unmatched files:", flush=True)
        for line in pairs.skipped[:limit]:
            print(f"  {line}", flush=True)
        if len(pairs.skipped) > limit:
            print(f"  ... and {len(pairs.skipped) - limit} more", flush=True)


def main(config: SegmentConfig) -> int:
    run, config = start_run(config, f"main_segmentation ({'eval' if config.eval else 'train'})")
    names = class_names_for(config.nb_classes)
    val_pairs = find_pairs(config.data_path, "val")
    report_skipped("validation", val_pairs)
    val_set = SegmentationDataset(val_pairs, train=False, reduce_zero_label=config.reduce_zero_label,
                                  test_scale=config.img_scale, num_classes=config.nb_classes)
    val = eval_loader(val_set, 1, run.world, run.rank, config.num_workers, run.device, config.pin_mem)
    model = build_model(config, run)
    run.log(setup_cpu_training(model, run.device, config.cpu_matmul, compiled=config.compile and not config.eval))
    groups = dense_param_groups(model, model.backbone, config.weight_decay, config.layer_decay, rule="beit")
    optimizer = make_adamw(groups, config.lr, run.device, betas=config.opt_betas)
    if config.eval:
        evaluated = weights_to_evaluate(config) if not config.random_weights else ""
        if evaluated:
            load_trained_weights(model, evaluated, ARCHITECTURE)
            run.log(f"evaluating {evaluated}: UperNet on {config.model}, {config.nb_classes} classes, "
                    f"{config.test_mode} inference")
        else:
            run.log(f"evaluating untrained heads on {config.model} (--random_weights)")
        return evaluate_only(run, SegmentTask(config, model, model, run, val, names))
    periods = Periods(config.eval_interval, config.iters, unit="iteration")
    state = TrainState(RunFlags.of(config, epochs=periods.count), model, optimizer, make_scaler(config.amp, run.device),
                       best_key=SegmentTask.best_key)
    state.resume(log=lambda *a, **k: print(*a, **k) if is_main_process() else None, position=periods.position)
    per_norm = config.batch_size * (run.world if run.distributed and run.device.type == "cuda" else 1)
    if per_norm < 2:
        raise UsageError(f"--batch_size {config.batch_size}: the BatchNorm after UperNet's 1x1 pooling needs at least "
                         f"2 images per batch statistic (SyncBatchNorm only on CUDA); use --batch_size 2 or more")
    loader, train_set = segmentation_loader(config, run)
    state.train_model = wrap_for_training(model, run, config.compile)
    sync = ("" if not run.distributed else "; SyncBatchNorm" if run.device.type == "cuda" else
            "; BatchNorm per rank (SyncBatchNorm needs CUDA)")
    run.note(f"UperNet on {config.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
             f"{len(train_set)} train / {len(val_set)} val pairs; {config.iters} iterations x "
             f"{config.batch_size * run.world} images, evaluation every {config.eval_interval} ({config.test_mode}); "
             f"lr {config.lr:.3e}; amp {config.amp}; world {run.world}{sync}",
             start={"chunk": state.epoch, "step": state.step}, num_train=len(train_set), num_val=len(val_set))
    write_recipe(config, run.rank)
    schedule = PolySchedule(config.lr, config.min_lr, config.warmup_iters, config.iters, config.power,
                            config.warmup_ratio)
    task = SegmentTask(config, model, state.train_model, run, val, names)
    return Trainer(run, state, task, loader, schedule, periods, step_settings(config),
                   evaluate=Cadence(config.eval_interval), save=Cadence(config.save_freq * config.eval_interval),
                   exit_after=config.exit_after_epoch).fit()


def build_model(config: SegmentConfig, run: Run) -> SegmentationModel:
    # built at the crop size, as the reference: PVT's / ViT's position grid is resized once at loading
    # (PVT-S: 64x64 -> 128x128), then learnt at that size; other input sizes resize it on the fly
    # the backbone's starting weights: none when a trained checkpoint (resumed or evaluated) brings them all
    start = "" if config.resume or (config.eval and not config.random_weights) else config.finetune
    backbone = build_backbone(config.model, start,
                              config.drop_path, img_size=config.input_size, log=run.log)
    model = SegmentationModel(backbone, config.nb_classes, adapter_dim=config.channels, channels=config.channels,
                              dropout=config.dropout, aux_channels=config.aux_channels, aux_weight=config.aux_weight,
                              avg_non_ignore=config.avg_non_ignore)
    if run.distributed and run.device.type == "cuda":  # statistics over the global batch (the reference's SyncBN)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(run.device)


def segmentation_loader(config: SegmentConfig, run: Run):
    train_pairs = find_pairs(config.data_path, "train")
    report_skipped("training", train_pairs)
    transform = TrainTransform(config.input_size, config.img_scale, config.ratio_range, config.cat_max_ratio,
                               photometric=config.photometric)
    train_set = SegmentationDataset(train_pairs, train=True, reduce_zero_label=config.reduce_zero_label,
                                    transform=transform, num_classes=config.nb_classes)
    sampler = IterationSampler(len(train_set), run.world, run.rank, config.seed, config.batch_size, config.iters,
                               config.eval_interval)
    loader = train_loader(train_set, config.batch_size, run.world, run.rank, config.seed, config.num_workers,
                          run.device, config.pin_mem, sampler=sampler)
    return loader, train_set


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
