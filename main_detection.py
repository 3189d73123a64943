"""Object detection / instance segmentation finetuning on COCO, under torchrun (DETECTION.md).

    torchrun --nproc_per_node=8 main_detection.py --config recipes/detection_gfl_swin_tiny.yaml \
        --finetune work_dirs/finetune_mae_swin_tiny_256/checkpoint-99.pth \
        --data_path /path/to/coco --output_dir work_dirs/gfl_swin_tiny --log_dir work_dirs/gfl_swin_tiny

``--detector gfl`` (default) is the reference's detector: GFL (ATSS, QFL, DFL, GIoU) on LN + Linear
adapters and an FPN; ``--detector mask_rcnn``: torchvision's Mask R-CNN on the same backbone and
adapters (box and mask AP). Every flag defaults to the reference's recipe (DETECTION.md, "Flags").
Evaluation: the 12 COCO numbers by pycocotools after every ``--eval_freq`` epochs, as JSON
(``eval_epoch{E}.json``); one image per forward, as mmdet, so the numbers do not depend on
``--batch_size`` or the number of ranks.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from config.cli import ArgumentParser, HelpFormatter, add_common_args, answer_usage_first
from detection import DETECTORS


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser("UM-MAE detection finetuning (GFL / Mask R-CNN, COCO)", add_help=add_help,
                       formatter_class=HelpFormatter)
    p.add_argument("--detector", default="gfl", choices=DETECTORS,
                   help="gfl: the reference's GFL head; mask_rcnn: torchvision's Mask R-CNN (box + mask AP)")
    p.add_argument("--batch_size", default=2, type=int,
                   help="training images per GPU (evaluation runs one image per forward, as mmdet)")
    p.add_argument("--epochs", default=25, type=int)
    p.add_argument("--accum_iter", default=1, type=int)
    p.add_argument("--model", default="swin_tiny_256", type=str,
                   help="backbone: a classifier name (Swin, PVT, ViT); built at its native size")
    p.add_argument("--finetune", default="", help="backbone weights: a pretraining or finetuning checkpoint")
    p.add_argument("--input_size", default=1024, type=int, help="training crop (and pad) size")
    p.add_argument("--ratio_range", default=(0.1, 2.0), type=float, nargs=2,
                   help="training resize: long side = input_size x U(ratio_range)")
    p.add_argument("--test_size", default=(1333, 800), type=int, nargs=2, help="test resize: fit long x short")
    p.add_argument("--drop_path", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (absolute; the recipe's is for "
                                                          "16 images per step)")
    p.add_argument("--layer_decay", type=float, default=1.0, help="layer-wise lr decay of the backbone (1: none)")
    p.add_argument("--min_lr_ratio", type=float, default=0.01, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup_iters", type=int, default=2000, help="linear warmup, in optimizer steps")
    p.add_argument("--adapter_dim", type=int, default=768, help="LN + Linear adapter width (the reference's 768)")
    p.add_argument("--fpn_dim", type=int, default=256)
    p.add_argument("--neck_norm", default="bn", choices=["bn", "gn", "none"],
                   help="FPN normalisation: bn (SyncBatchNorm under DDP on CUDA, as the reference), gn, none")
    p.add_argument("--score_thr", type=float, default=0.05, help="test: minimum class score")
    p.add_argument("--max_dets", type=int, default=100, help="test: detections per image")
    p.add_argument("--data_path", default=None, type=str, help="COCO layout: annotations/, train2017/, val2017/")
    p.add_argument("--eval", action="store_true",
                   help="evaluate the weights of --resume (a checkpoint of this program, e.g. "
                        "OUTPUT_DIR/checkpoint-best.pth) only; its detector, backbone and test settings are used "
                        "unless given")
    p.add_argument("--random_weights", action="store_true",
                   help="with --eval: evaluate an untrained detector on purpose (a baseline); --eval refuses it "
                        "otherwise")
    p.add_argument("--eval_freq", type=int, default=1, help="evaluate every N epochs (and after the last)")
    add_common_args(p)
    p.set_defaults(save_freq=5, print_freq=50)
    return p


# --help and flag errors answer before torch, torchvision and timm load
answer_usage_first(get_args_parser, __name__ == "__main__")

import functools  # noqa: E402
import torch  # noqa: E402
from config.cli import (check_task_checkpoint, dense_backbone, parse, run_main, weights_to_evaluate,  # noqa: E402
                        write_recipe)
from config.detection import ARCHITECTURE, EVAL_SETTINGS, MARKER, DetectConfig, resolve  # noqa: E402
from config.rules import Problems  # noqa: E402
from config.sections import step_settings  # noqa: E402
from detection.coco import CocoDetection, check_layout, collate  # noqa: E402
from detection.detector import build_detector  # noqa: E402
from engine.cpu_perf import setup_cpu_training  # noqa: E402
from engine.distributed import is_main_process  # noqa: E402
from engine.evaluate import load_trained_weights  # noqa: E402
from engine.loaders import eval_loader, train_loader  # noqa: E402
from engine.optim import dense_param_groups, make_adamw  # noqa: E402
from engine.run import start_run, wrap_for_training  # noqa: E402
from engine.schedule import CosineSchedule  # noqa: E402
from engine.state import RunFlags, TrainState  # noqa: E402
from engine.step import make_scaler  # noqa: E402
from engine.trainer import Cadence, Periods, Trainer, evaluate_only, require_a_batch  # noqa: E402
from engine_detection import DetectTask  # noqa: E402
from errors import DataError, UsageError  # noqa: E402
from util.pretrained import build_backbone  # noqa: E402


def parse_args(argv=None) -> DetectConfig:
    """Flags -> config: every flag combination that cannot work fails here, before any compute (and
    before launch.slurm submits a job)."""
    return configure(parse(get_args_parser(), argv, Path(__file__).name, architecture=ARCHITECTURE + EVAL_SETTINGS,
                           marker=MARKER))


def configure(flags: argparse.Namespace) -> DetectConfig:
    """The config of parsed flags (the model described once, on the meta device; the data listed).
    Every problem found is named in one UsageError."""
    problems = Problems()
    contract, problem = dense_backbone(flags.model)
    problems.add(problem)
    if flags.data_path is None:
        problems.add("--data_path is required: a COCO folder with annotations/instances_{train,val}2017.json, "
                     "train2017/ and val2017/")
    else:
        try:
            check_layout(flags.data_path, ["val"] if flags.eval else ["train", "val"])
        except DataError as e:
            problems.add(str(e))
    for problem in check_task_checkpoint(flags, MARKER, "main_detection.py", "detection heads", ARCHITECTURE):
        problems.add(problem)
    config = None
    with problems.check():
        config = resolve(flags, contract)
    problems.raise_any()
    return config


def log(*a, **k) -> None:
    if is_main_process():
        print(*a, **{"flush": True, **k})


def main(config: DetectConfig) -> int:
    run, config = start_run(config, f"main_detection ({'eval' if config.eval else 'train'})")
    train_set, val_set = coco_sets(config)
    evaluated = weights_to_evaluate(config) if config.eval and not config.random_weights else ""
    # the backbone's starting weights: none when a trained checkpoint (resumed or evaluated) brings them all
    start = "" if config.resume or evaluated else config.finetune
    backbone = build_backbone(config.model, start, drop_path=config.drop_path, log=log)
    model = build_detector(config.detector, backbone, len(val_set.cat_ids), adapter_dim=config.adapter_dim,
                           fpn_dim=config.fpn_dim, neck_norm=config.neck_norm, score_thr=config.score_thr,
                           max_per_img=config.max_dets)
    if run.distributed and run.device.type == "cuda" and config.neck_norm == "bn":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(run.device)
    cpu_note = setup_cpu_training(model, run.device, config.cpu_matmul, compiled=config.compile and not config.eval)
    run.log(cpu_note)
    collate_fn = functools.partial(collate, size_divisor=backbone.size_divisor)
    # one image per evaluation forward, as mmdet: the numbers do not depend on --batch_size or the world size
    val = eval_loader(val_set, 1, run.world, run.rank, config.num_workers, run.device, config.pin_mem,
                      collate=collate_fn)
    if config.eval:
        if evaluated:
            load_trained_weights(model, evaluated, ARCHITECTURE)
            log(f"evaluating {evaluated}: {config.detector} on {config.model}, test size "
                f"{config.test_size[0]}x{config.test_size[1]}")
        else:
            log(f"evaluating an untrained {config.detector} on {config.model} (--random_weights)")
        return evaluate_only(run, DetectTask(config, model, model, run, val, val_set))
    optimizer = make_adamw(dense_param_groups(model, backbone, config.weight_decay, config.layer_decay), config.lr,
                           run.device)
    state = TrainState(RunFlags.of(config), model, optimizer, make_scaler(config.amp, run.device),
                       best_key=DetectTask.best_key)
    loader = train_loader(train_set, config.batch_size, run.world, run.rank, config.seed, config.num_workers,
                          run.device, config.pin_mem, collate=collate_fn)
    require_a_batch(len(loader), len(train_set), config.batch_size, run.world)
    steps = len(loader)
    check_warmup(config.warmup_iters, steps, config)
    state.resume(log=log)
    state.train_model = wrap_for_training(model, run, config.compile)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.note(f"{config.detector} on {config.model}: {n_params / 1e6:.2f}M parameters; {len(val_set.cat_ids)} classes; "
             f"{len(train_set)} train / {len(val_set)} val images; lr {config.lr:.3e}; amp {config.amp}; world "
             f"{run.world}", cpu=cpu_note or None, start={"epoch": state.epoch, "step": state.step}, num_train=len(train_set),
             num_val=len(val_set), num_classes=len(val_set.cat_ids))
    write_recipe(config, run.rank)
    # the cosine schedule is in epochs: warmup iterations (optimizer steps) and the floor converted
    schedule = CosineSchedule(config.lr, config.lr * config.min_lr_ratio,
                              config.warmup_iters / (steps / config.accum_iter), config.epochs)
    task = DetectTask(config, model, state.train_model, run, val, val_set)
    return Trainer(run, state, task, loader, schedule, Periods(steps, steps * config.epochs), step_settings(config),
                   evaluate=Cadence(config.eval_freq * steps), save=Cadence(config.save_freq * steps),
                   exit_after=config.exit_after_epoch).fit()


def check_warmup(warmup_iters: int, steps: int, config: DetectConfig) -> None:
    """A warmup as long as the run never reaches --lr (a smoke run with the recipe's 2000 steps trains at
    ~1e-7): refused, as segmentation refuses it, once the number of steps per epoch is known."""
    total = steps * config.epochs // config.accum_iter
    if warmup_iters >= total:
        raise UsageError(f"--warmup_iters {warmup_iters} is not shorter than the run's {total} optimizer steps "
                         f"({steps} per epoch x --epochs {config.epochs} / --accum_iter {config.accum_iter}): the lr "
                         f"would never reach --lr; use --warmup_iters {max(0, total // 10)} (a tenth of the run) or "
                         f"fewer")


def coco_sets(config: DetectConfig) -> tuple[CocoDetection | None, CocoDetection]:
    """The training set (None for --eval) and the validation set, with what they left out named."""
    kw = dict(input_size=config.input_size, ratio_range=config.ratio_range, test_size=config.test_size,
              with_masks=config.with_masks)
    try:
        train_set = None if config.eval else CocoDetection(config.data_path, "train", train=True, **kw)
        cats = train_set.cat_ids if train_set is not None else None
        val_set = CocoDetection(config.data_path, "val", train=False, categories=cats, **kw)
    except DataError as e:
        raise UsageError(str(e)) from None
    for ds in (train_set, val_set):
        if ds is not None and ds.skipped_summary():
            log(ds.skipped_summary())
    if train_set is not None and len(train_set) == 0:
        raise UsageError(f"{config.data_path}: no training image has a usable box")
    return train_set, val_set


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
