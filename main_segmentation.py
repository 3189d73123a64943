"""Semantic segmentation (ADE20K): UperNet + FCN auxiliary head on our Swin / PVT backbones, under torchrun.

    torchrun --nproc_per_node=8 main_segmentation.py --model swin_tiny_256 \
        --finetune ./work_dirs/finetune_mae_swin_tiny_256/checkpoint-99.pth \
        --data_path /path/to/ADEChallengeData2016 --output_dir ./work_dirs/seg_swin_tiny --log_dir ...

Every flag defaults to the reference's recipe (SEGMENTATION.md, "What each flag does"). Training
is counted in iterations: the step loop's "epoch" is one evaluation interval (``--eval_interval``
iterations), and checkpoints record that chunk. ``--eval`` evaluates the weights only.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import models
from engine_segmentation import evaluate, train_chunk
from dense.backbone import build_backbone, dense_models, dense_param_groups, has_pyramid
from segmentation.data import IterationSampler, SegmentationDataset, TrainTransform, find_pairs, num_chunks
from segmentation.heads import SegmentationModel
from segmentation.metrics import class_names_for
from util.cli import UsageError, add_common_args, check_output_dirs, finalize_common_args, run_main
from util.cpu_perf import setup_cpu_training
from util.datasets import DataError, ShardSampler
from util.distributed import cleanup, is_main_process
from util.loop import fused_optimizer_ok, make_scaler
from util.lr_sched import poly_lr_at
from util.run import EpochSave, Epochs, run_epochs, start_run, wrap_for_training
from util.run_record import summary_line as run_summary
from util.stop import ignore_stop_signals
from util.train_state import resume_training_state

TEST_MODES = ("slide", "whole", "both")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("UM-MAE semantic segmentation (UperNet)", add_help=add_help)
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
    p.add_argument("--nb_classes", default=150, type=int)
    p.add_argument("--data_path", default=None, type=str,
                   help="ADE20K layout: images/{training,validation}, annotations/{training,validation}")
    p.add_argument("--eval", action="store_true", help="evaluate only")
    add_common_args(p)
    p.set_defaults(save_freq=1)
    p.set_defaults(num_workers=4)
    for a in p._actions:  # the chunk is this program's epoch
        if a.dest == "save_freq":
            a.help = "write checkpoint-{chunk}.pth every N evaluation intervals"
        if a.dest == "exit_after_epoch":
            a.help = "finish this evaluation interval (chunk, counted from 0), checkpoint and exit"
    return p


def _validate(args) -> None:
    if args.model not in models.list_models(task="classify"):
        raise UsageError(f"unknown --model {args.model!r}; valid backbones: {', '.join(dense_models())}")
    for flag in ("batch_size", "iters", "accum_iter", "eval_interval", "nb_classes", "input_size", "test_stride"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.nb_classes > 255:
        raise UsageError(f"--nb_classes {args.nb_classes}: at most 255 (label 255 means ignore)")
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        raise UsageError(f"--ratio_range needs 0 < min <= max, got {args.ratio_range}")
    if args.test_stride > args.input_size:
        raise UsageError(f"--test_stride {args.test_stride} exceeds the window --input_size {args.input_size}: "
                         f"pixels between windows would get no prediction")
    if args.warmup_iters < 0 or args.warmup_iters >= args.iters and not args.eval:
        raise UsageError(f"--warmup_iters {args.warmup_iters} must be in [0, --iters {args.iters})")
    try:
        with torch.device("meta"):
            meta = models.create_model(args.model, num_classes=0, img_size=args.input_size)
    except ValueError as e:
        raise UsageError(f"--input_size {args.input_size}: {e}") from None
    if not has_pyramid(meta):
        raise UsageError(f"--model {args.model} has no feature pyramid; valid backbones: {', '.join(dense_models())}")
    if args.eval and args.finetune:
        args.auto_resume = False
    for flag in ("finetune", "resume"):
        if getattr(args, flag) and not Path(getattr(args, flag)).is_file():
            raise UsageError(f"--{flag} checkpoint {getattr(args, flag)} does not exist")
    try:  # the layout and the pairing by name; main reads the sizes once
        find_pairs(args.data_path, "val", check_sizes=False)
        if not args.eval:
            find_pairs(args.data_path, "train", check_sizes=False)
    except DataError as e:
        raise UsageError(str(e)) from None
    check_output_dirs(args)


def parse_args(argv=None, defaults: dict | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    finalize_common_args(args)
    if args.data_path is None:
        raise UsageError("--data_path is required: a folder in ADE20K layout (images/, annotations/)")
    _validate(args)
    return args


def report_skipped(split: str, pairs, limit: int = 10) -> None:
    if pairs.skipped and is_main_process():
        print(f"{split}: skipped {len(pairs.skipped)} unmatched files:", flush=True)
        for line in pairs.skipped[:limit]:
            print(f"  {line}", flush=True)
        if len(pairs.skipped) > limit:
            print(f"  ... and {len(pairs.skipped) - limit} more", flush=True)


def build_model(args, device) -> SegmentationModel:
    # built at the crop size, as the reference: PVT's / ViT's position grid is resized once at loading
    # (PVT-S: 64x64 -> 128x128), then learnt at that size; other input sizes resize it on the fly
    backbone = build_backbone(args.model, args.finetune if args.finetune and not args.resume else "",
                              args.drop_path, img_size=args.input_size,
                              log=lambda m: print(m, flush=True) if is_main_process() else None)
    model = SegmentationModel(backbone, args.nb_classes, adapter_dim=args.channels, channels=args.channels,
                              dropout=args.dropout, aux_channels=args.aux_channels, aux_weight=args.aux_weight,
                              avg_non_ignore=args.avg_non_ignore)
    return model.to(device)


def make_optimizer(args, model, device):
    groups = dense_param_groups(model, model.backbone, args.weight_decay, args.layer_decay, rule="beit")
    for g in groups:
        g.pop("param_names", None)
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.opt_betas),
                             fused=fused_optimizer_ok(device) or None)


def schedule(epoch: float, args) -> float:
    """The step loop's fractional chunk -> iteration -> poly lr."""
    chunk = int(epoch)
    length = min(args.eval_interval, args.iters - chunk * args.eval_interval)
    it = chunk * args.eval_interval + round((epoch - chunk) * length)
    return poly_lr_at(it, args.lr, args.min_lr, args.warmup_iters, args.iters, args.power, args.warmup_ratio)


def run_evaluation(model, loader, args, device, names) -> dict:
    modes = ("slide", "whole") if args.test_mode == "both" else (args.test_mode,)
    return {m: evaluate(model, loader, device, args.nb_classes, names, m, args.input_size, args.test_stride,
                        args.amp, sharded=True) for m in modes}


def summary_line(results: dict) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"
    return "; ".join(f"{m}: mIoU {pct(r['mIoU'])} mAcc {pct(r['mAcc'])} aAcc {pct(r['aAcc'])} "
                     f"({r['images']} images)" for m, r in results.items())


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def main(args) -> int:
    args.epochs = num_chunks(args.iters, args.eval_interval)  # one 'epoch' of the shared loop = one interval
    run = start_run(args, f"main_segmentation ({'eval' if args.eval else 'train'})")
    device, rank, world = run.device, run.rank, run.world
    names = class_names_for(args.nb_classes)
    val_pairs = find_pairs(args.data_path, "val")
    report_skipped("validation", val_pairs)
    val_set = SegmentationDataset(val_pairs, train=False, reduce_zero_label=args.reduce_zero_label,
                                  test_scale=tuple(args.img_scale), num_classes=args.nb_classes)
    val_loader = DataLoader(val_set, batch_size=1, sampler=ShardSampler(len(val_set), world, rank),
                            num_workers=args.num_workers, worker_init_fn=ignore_stop_signals)
    model = build_model(args, device)
    if args.distributed and device.type == "cuda":  # statistics over the global batch (the reference's SyncBN)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    cpu_note = setup_cpu_training(model, device, args.cpu_matmul, compiled=args.compile and not args.eval)
    if cpu_note and is_main_process():
        print(cpu_note, flush=True)

    args.lr_schedule = functools.partial(schedule, args=args)
    optimizer = make_optimizer(args, model, device)
    scaler = make_scaler(args.amp, device)
    start_chunk, start_step, ckpt = resume_training_state(
        args, model, optimizer, scaler, log=lambda *a, **k: print(*a, **k) if is_main_process() else None)
    best = float(ckpt.get("best_miou", 0.0)) if ckpt else 0.0

    if args.eval:
        return evaluate_only(run, model, val_loader, names)

    per_norm = args.batch_size * (world if args.distributed and device.type == "cuda" else 1)
    if per_norm < 2:
        raise UsageError(f"--batch_size {args.batch_size}: the BatchNorm after UperNet's 1x1 pooling needs at least "
                         f"2 images per batch statistic (SyncBatchNorm only on CUDA); use --batch_size 2 or more")
    train_pairs = find_pairs(args.data_path, "train")
    report_skipped("training", train_pairs)
    transform = TrainTransform(args.input_size, tuple(args.img_scale), tuple(args.ratio_range), args.cat_max_ratio,
                               photometric=args.photometric)
    train_set = SegmentationDataset(train_pairs, train=True, reduce_zero_label=args.reduce_zero_label,
                                    transform=transform, num_classes=args.nb_classes)
    sampler = IterationSampler(len(train_set), world, rank, args.seed, args.batch_size, args.iters, args.eval_interval)
    train_loader = DataLoader(train_set, sampler=sampler, batch_size=args.batch_size, drop_last=True,
                              num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == "cuda",
                              persistent_workers=args.num_workers > 0, worker_init_fn=ignore_stop_signals)
    train_model = wrap_for_training(model, args, device)
    if is_main_process():
        sync = ("" if not args.distributed else "; SyncBatchNorm" if device.type == "cuda" else
                "; BatchNorm per rank (SyncBatchNorm needs CUDA)")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"UperNet on {args.model}: {n_params / 1e6:.2f}M parameters; {len(train_set)} train / {len(val_set)} "
              f"val pairs; {args.iters} iterations x {args.batch_size * world} images, evaluation every "
              f"{args.eval_interval} ({args.test_mode}); lr {args.lr:.3e}; amp {args.amp}; world {world}{sync}",
              flush=True)
    run.open_log_writer()
    run.record.note(start={"chunk": start_chunk, "step": start_step}, num_train=len(train_set),
                    num_val=len(val_set), cpu=cpu_note or None)
    chunks = SegmentationChunks(run, model, train_model, train_loader, val_loader, optimizer, scaler, names,
                                start_chunk, best)
    return run_epochs(run, chunks, model, optimizer, scaler, sampler, start_chunk, start_step)


def evaluate_only(run, model, val_loader, names) -> int:
    """--eval: mIoU / mAcc / aAcc of the loaded weights on the validation split; eval.json."""
    args = run.args
    results = run_evaluation(model, val_loader, args, run.device, names)
    if is_main_process():
        print(f"evaluation: {summary_line(results)}", flush=True)
        write_json(Path(args.output_dir) / "eval.json", {"weights": args.resume or args.finetune or "latest",
                                                         **results})
        print(run_summary(f"{args.model} segmentation evaluation", "completed", time.time() - run.start_time,
                          [summary_line(results)], args.output_dir), flush=True)
        run.record.finish("completed", metrics=results)
    cleanup()
    return 0


class SegmentationChunks(Epochs):
    """Segmentation's part of the loop (util.run): one "epoch" is one evaluation interval of
    ``--eval_interval`` iterations, evaluated after it (every mode of --test_mode)."""

    best_key = "best_miou"

    def __init__(self, run, model, train_model, train_loader, val_loader, optimizer, scaler, names,
                 start_chunk: int, best: float) -> None:
        super().__init__(run, start_chunk, best)
        self.model, self.train_model = model, train_model
        self.train_loader, self.val_loader, self.optimizer, self.scaler = train_loader, val_loader, optimizer, scaler
        self.names = names
        self.results: dict = {}
        self.train_stats: dict = {}

    def train(self, chunk: int, start_step: int) -> dict:
        self.train_stats = train_chunk(self.train_model, self.train_loader, self.optimizer, self.scaler,
                                       self.run.device, chunk, self.args, self.run.log_writer,
                                       stop_flag=self.run.stop, start_step=start_step)
        return self.train_stats

    def evaluate(self, chunk: int, stats: dict, last: bool) -> EpochSave:
        args = self.args
        results = self.results = run_evaluation(self.model, self.val_loader, args, self.run.device, self.names)
        done = min((chunk + 1) * args.eval_interval, args.iters)
        miou = next(iter(results.values()))["mIoU"] or 0.0
        improved = miou > self.best
        self.best = max(self.best, miou)
        record = {"epoch": chunk, "iteration": done, **{f"train_{k}": v for k, v in stats.items()},
                  **{f"{m}_{k}": r[k] for m, r in results.items() for k in ("mIoU", "mAcc", "aAcc")}}
        return EpochSave(record, extra={"val_miou": miou, "iteration": done},
                         extra_names=("checkpoint-best.pth",) if improved else ())

    def log(self, chunk: int, stats: dict, last: bool) -> None:
        done = min((chunk + 1) * self.args.eval_interval, self.args.iters)
        print(f"iteration {done}: {summary_line(self.results)} (best mIoU {100 * self.best:.2f})", flush=True)
        write_json(Path(self.args.output_dir) / f"eval_iter_{done}.json", {"iteration": done, **self.results})
        writer = self.run.log_writer
        if writer is not None:
            for m, r in self.results.items():
                for k in ("mIoU", "mAcc", "aAcc"):
                    if r[k] is not None:  # the step loop's x axis: (chunk + fraction) x 1000
                        writer.add_scalar(f"val_{m}/{k}", r[k], (chunk + 1) * 1000)

    def best_text(self) -> str:
        return f"best mIoU {100 * self.best:.2f}"

    def finish(self, status: str, last_chunk: int, **extra) -> None:
        parts = [f"last {summary_line(self.results)}"] if self.results else []
        parts.append(f"best mIoU {100 * self.best:.2f}")
        self.run.finish(f"{self.args.model} UperNet segmentation", status, self.start_epoch, last_chunk, parts,
                        best_miou=self.best, final_train=self.train_stats or None, final_val=self.results or None,
                        **extra)


validate_args = _validate  # the public name util/slurm.py calls


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
