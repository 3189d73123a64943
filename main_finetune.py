"""Finetuning, linear probing and k-NN evaluation of pretrained encoders, under torchrun.

    torchrun --nproc_per_node=8 main_finetune.py --model swin_tiny_256 ...(the recipe's flags) \
        --finetune ./work_dirs/pretrain_mae_swin_tiny_256/checkpoint-199.pth \
        --data_path /path/to/ImageNet/ --output_dir ...

Modes: default = finetuning; ``--linprobe`` = frozen encoder + BatchNorm (no affine) + linear
head, LARS (main_linprobe.py sets MAE's recipe); ``--knn`` = k-NN accuracy of frozen features;
``--eval`` = evaluate the weights only. The recipes, with their full commands, are in FINETUNE.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import models
from engine_finetune import evaluate, finetune_one_epoch
from errors import UsageError
from config.cli import HelpFormatter, add_common_args, check_output_dirs, finalize_common_args, run_main
from engine.cpu_perf import setup_cpu_training
from errors import DataError
from imagedata.datasets import (SeededSampler, ShardSampler, build_finetune_dataset, image_list, num_classes_of, report_left_out)
from config.rules import (DECAY, NON_NEGATIVE, POSITIVE, TRAINING_RULES, UNIT, UNIT_RIGHT_OPEN, at_least,
                              check_auto_augment, check_existing, check_ranges)
from imagedata.shards import ShardStream, shard_loader
from engine.distributed import cleanup, is_main_process
from engine.step import fused_optimizer_ok, make_scaler
from engine.optim import param_groups_lrd
from util.pretrained import load_pretrained
from engine.trainer import EpochSave, Epochs, effective_lr, require_a_batch, run_epochs, start_run, wrap_for_training
from engine.record import summary_line
from engine.stop import ignore_stop_signals
from engine.state import resume_training_state


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("UM-MAE finetuning / linear probing / k-NN", add_help=add_help,
                                formatter_class=HelpFormatter)
    p.add_argument("--batch_size", default=64, type=int, help="images per GPU (effective = batch * accum * GPUs)")
    p.add_argument("--epochs", default=50, type=int, help="length of the schedule")
    p.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--model", default="swin_tiny_256", type=str, help="classifier name")
    p.add_argument("--input_size", default=None, type=int, help="default: the model's native size")
    p.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    p.add_argument("--weight_decay", type=float, default=0.05, help="AdamW (LARS for --linprobe) weight decay")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * eff_batch / 256)")
    p.add_argument("--blr", type=float, default=1e-3, help="base lr per 256 images")
    p.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay factor")
    p.add_argument("--min_lr", type=float, default=1e-6, help="lr at the end of the cosine schedule")
    p.add_argument("--warmup_epochs", type=int, default=5, help="epochs of linear lr warm-up")
    p.add_argument("--color_jitter", type=float, default=None,
                   help="colour jitter factor (default: none; timm ignores it when --aa is set)")
    p.add_argument("--min_crop_scale", type=float, default=0.08,
                   help="smallest area fraction of RandomResizedCrop (timm's 0.08; raise it for tiny images, "
                        "where an 8%% crop of a 32-px image keeps ~9 px of content)")
    p.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('none': off)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--remode", type=str, default="pixel", help="random erasing mode (timm)")
    p.add_argument("--recount", type=int, default=1, help="random erasing count (timm)")
    p.add_argument("--resplit", action="store_true", default=False,
                   help="do not erase the first augmentation split (timm)")
    p.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    p.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                   help="CutMix min/max box ratio; overrides --cutmix (default: not used)")
    p.add_argument("--mixup_prob", type=float, default=1.0, help="probability of Mixup or CutMix per batch")
    p.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of CutMix instead of Mixup")
    p.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"],
                   help="how Mixup/CutMix parameters are drawn")
    p.add_argument("--finetune", default="", help="initialise from this checkpoint (pretrained or finetuned)")
    p.add_argument("--global_pool", action="store_true", default=True,
                   help="ViT: classify the mean of the patch tokens (default on)")
    p.add_argument("--cls_token", action="store_false", dest="global_pool", help="ViT: classify the cls token")
    p.add_argument("--nb_classes", default=None, type=int,
                   help="classes of the head (default: inferred from the data; a value given is checked against it)")
    p.add_argument("--data_path", default=None, type=str,
                   help="train/ and val/ in ImageNet layout, or lists, or tar shards (a folder of train-*.tar and "
                        "val-*.tar, or a .tar pattern with {split})")
    p.add_argument("--eval", action="store_true", help="evaluate only")
    p.add_argument("--dist_eval", action="store_true", default=False, help="shard the val set across ranks")
    p.add_argument("--linprobe", action="store_true", help="linear probing: frozen encoder, BN + linear head")
    p.add_argument("--knn", action="store_true", help="k-NN evaluation of frozen features")
    p.add_argument("--knn_k", type=int, default=20, help="k-NN: neighbours that vote")
    p.add_argument("--knn_t", type=float, default=0.07, help="k-NN: temperature of the similarity weights")
    p.add_argument("--eval_freq", type=int, default=1,
                   help="evaluate on val/ every N epochs and after the last (best checkpoint among those)")
    add_common_args(p)
    return p


def model_kwargs(args, contract: models.ClassifierContract) -> dict:
    """The factory keywords of --model: the ones every classifier takes, and the options its contract names."""
    kwargs = dict(num_classes=args.nb_classes, drop_path_rate=0.0 if (args.linprobe or args.knn) else args.drop_path)
    if args.input_size is not None:
        kwargs["img_size"] = args.input_size
    if "global_pool" in contract.options:
        kwargs["global_pool"] = args.global_pool
    return kwargs


def _describe(args) -> models.ClassifierContract:
    """--model's contract, built on the meta device at --input_size; a size it cannot take is a usage error."""
    kwargs = {"num_classes": 0} if args.input_size is None else {"num_classes": 0, "img_size": args.input_size}
    try:
        return models.describe(args.model, **kwargs)
    except ValueError as e:
        raise UsageError(f"--input_size {args.input_size}: {e}") from None


FINETUNE_RULES = TRAINING_RULES + [
    ("drop_path", UNIT_RIGHT_OPEN), ("layer_decay", DECAY), ("color_jitter", NON_NEGATIVE),
    ("smoothing", UNIT_RIGHT_OPEN), ("reprob", UNIT), ("recount", at_least(1)), ("mixup", NON_NEGATIVE),
    ("cutmix", NON_NEGATIVE), ("cutmix_minmax", DECAY), ("mixup_prob", UNIT), ("mixup_switch_prob", UNIT),
    ("nb_classes", at_least(1)), ("knn_k", at_least(1)), ("knn_t", POSITIVE),
]
RANDOM_ERASING_MODES = ("pixel", "rand", "const")


def validate_args(args) -> None:
    """Every flag combination that cannot work fails here, before any compute (launch/slurm.py calls it
    before submitting); resolved defaults (input size, classes, split sizes) are written into ``args``."""
    check_existing(args, ["finetune"])
    if not (args.data_path or "").endswith(".tar"):  # (a shard pattern is checked by image_list below)
        check_existing(args, ["data_path"], kind="dir")
    check_ranges(args, FINETUNE_RULES)
    if args.remode not in RANDOM_ERASING_MODES:
        raise UsageError(f"--remode {args.remode!r}: valid choices are {', '.join(RANDOM_ERASING_MODES)}")
    if args.cutmix_minmax is not None and len(args.cutmix_minmax) == 2 and \
            not args.cutmix_minmax[0] < args.cutmix_minmax[1]:
        raise UsageError(f"--cutmix_minmax {args.cutmix_minmax[0]} {args.cutmix_minmax[1]}: valid values are "
                         f"min < max, both in (0, 1]")
    if not (args.linprobe or args.knn or args.eval):
        check_auto_augment(args.aa)
    classifiers = models.list_models(task="classify")
    if args.model not in classifiers:
        hint = ""
        if models.is_model(args.model):
            hint = " (that is a pretraining model: finetune its checkpoint into the matching classifier)"
        raise UsageError(f"unknown --model {args.model!r}{hint}; valid classifiers: {', '.join(classifiers)}")
    if args.linprobe and args.knn:
        raise UsageError("--linprobe and --knn are different modes: choose one")
    for flag in ("batch_size", "epochs", "accum_iter", "eval_freq"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0.0 < args.min_crop_scale <= 1.0:
        raise UsageError(f"--min_crop_scale must be in (0, 1], got {args.min_crop_scale}")
    contract = _describe(args)
    if args.input_size is None:
        args.input_size = contract.input_size
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if args.cutmix_minmax is not None and len(args.cutmix_minmax) != 2:
        raise UsageError(f"--cutmix_minmax takes two numbers (min max), got {args.cutmix_minmax}")
    if args.knn and (args.knn_k < 1 or args.knn_t <= 0):
        raise UsageError(f"--knn needs --knn_k >= 1 and --knn_t > 0 (got {args.knn_k}, {args.knn_t})")
    if args.eval and args.finetune:
        args.auto_resume = False  # evaluate exactly the --finetune weights, not a checkpoint in --output_dir
    if mixup and args.batch_size % 2 and not (args.eval or args.linprobe or args.knn):
        raise UsageError(f"Mixup/CutMix needs an even --batch_size (got {args.batch_size})")
    try:
        val = image_list(args.data_path, "val", labelled=True)
        train = None if args.eval else image_list(args.data_path, "train", labelled=True)
    except DataError as e:
        raise UsageError(f"{e} (evaluation needs a val split)" if "'val'" in str(e) else str(e)) from None
    found = max(num_classes_of(val), num_classes_of(train) if train is not None else 0)
    if train is not None and train.classes and val.classes and train.classes != val.classes:
        raise UsageError(f"train/ and val/ have different class folders ({len(train.classes)} vs {len(val.classes)})")
    if args.nb_classes is None:
        args.nb_classes = found
    elif found != args.nb_classes:
        raise UsageError(f"--nb_classes {args.nb_classes} disagrees with the data: {args.data_path} has "
                         f"{found} classes")
    for split in (train, val):
        if split is not None:
            report_left_out(split)
    args.num_train = len(train) if train is not None else 0
    args.num_val = len(val)
    check_output_dirs(args)


def parse_args(argv=None, defaults: dict | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if argv is not None:  # called in-process (tools, tests): the run record shows these flags
        args.launch_command = [Path(__file__).name, *argv]
    finalize_common_args(args)
    if args.data_path is None:
        raise UsageError("--data_path is required: a folder with train/ and val/ (ImageNet layout or lists)")
    validate_args(args)
    return args


class LinearProbeHead(nn.Sequential):
    """MAE's probe: BatchNorm without affine parameters, then the linear classifier."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)


def build_model(args, device):
    model = models.create_model(args.model, **model_kwargs(args, models.describe(args.model, num_classes=0)))
    if args.linprobe:  # swap the head first, so a linear-probe checkpoint loads its head and BN statistics
        # timm heads that normalise before their Linear (Hiera's norm -> fc) keep the norm, frozen
        owner, attr = (model.head, "fc") if isinstance(getattr(model.head, "fc", None), nn.Linear) else (model, "head")
        linear = getattr(owner, attr)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        probe = LinearProbeHead(linear)
        setattr(owner, attr, probe)
        trainable = {id(p) for p in probe.parameters()}
        for p in model.parameters():
            p.requires_grad = id(p) in trainable
    if args.finetune and not args.resume:
        report = load_pretrained(model, args.finetune)
        if is_main_process():
            print(report.summary(), flush=True)
    return model.to(device)


def make_optimizer(args, model, device):
    if args.linprobe:  # MAE's probe optimizer: momentum 0.9, trust 0.001, 1-D tensors not decayed or adapted
        from engine.lars import LARS
        return LARS([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    groups = param_groups_lrd(model, args.weight_decay, args.layer_decay)
    for g in groups:
        g.pop("param_names", None)
    return torch.optim.AdamW(groups, lr=args.lr, fused=fused_optimizer_ok(device) or None)


def make_loader(dataset, args, train: bool, world: int, rank: int, shard: bool = False):
    """Training: shuffled and seeded per sample. Evaluation: sharded over ranks (each image once) when
    ``shard``, else every rank reads the whole set."""
    if isinstance(dataset, ShardStream):  # tar shards: the stream splits, shuffles and batches (imagedata/shards.py)
        dataset.world, dataset.rank = (world, rank) if (train or shard) else (1, 0)
        return shard_loader(dataset, args.num_workers, args.pin_mem and args.device.startswith("cuda"),
                            ignore_stop_signals), dataset
    if train:
        sampler = SeededSampler(dataset, world, rank, seed=args.seed, shuffle=True, drop_last=True)
    elif shard and world > 1:
        sampler = ShardSampler(len(dataset), world, rank)
    else:
        sampler = None
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, shuffle=False,
                      num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith("cuda"),
                      drop_last=train, persistent_workers=train and args.num_workers > 0,
                      worker_init_fn=ignore_stop_signals), sampler


def main(args) -> int:
    mode = "knn" if args.knn else "eval" if args.eval else "linprobe" if args.linprobe else "finetune"
    run = start_run(args, f"main_finetune ({mode})")
    device, rank, world = run.device, run.rank, run.world
    val_set = build_finetune_dataset(args, "val")
    shard_eval = args.dist_eval or args.knn
    val_loader, _ = make_loader(val_set, args, False, world, rank, shard=shard_eval)
    model = build_model(args, device)
    cpu_note = setup_cpu_training(model, device, args.cpu_matmul, compiled=args.compile and not (args.knn or args.eval),
                                  malloc=args.cpu_tuning)
    if cpu_note and is_main_process():
        print(cpu_note, flush=True)

    if args.knn:
        return knn_only(run, model, val_loader)

    args.lr = effective_lr(args, world)
    optimizer = make_optimizer(args, model, device)
    scaler = make_scaler(args.amp, device)
    start_epoch, start_step, ckpt = resume_training_state(args, model, optimizer, scaler,
                                                          log=lambda *a, **k: print(*a, **k) if is_main_process() else None)
    best_acc = float(ckpt.get("best_acc1", 0.0)) if ckpt else 0.0

    if args.eval:
        return evaluate_only(run, model, val_loader, shard_eval, ckpt)

    train_set = build_finetune_dataset(args, "train")
    train_loader, sampler = make_loader(train_set, args, True, world, rank)
    require_a_batch(len(train_loader), len(train_set), args, world)
    mixup_fn, criterion = make_criterion(args)
    train_model = wrap_for_training(model, args, device)
    if is_main_process():
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{args.model}: {n_train / 1e6:.2f}M trainable parameters; {len(train_set)} train / "
              f"{len(val_set)} val images; lr {args.lr:.3e}; amp {args.amp}; mode "
              f"{'linear probe' if args.linprobe else 'finetune'}; world {world}", flush=True)
    run.open_log_writer()
    run.record.note(start={"epoch": start_epoch, "step": start_step}, lr=args.lr, num_train=len(train_set),
                    num_val=len(val_set), nb_classes=args.nb_classes, cpu=cpu_note or None)
    epochs = FinetuneEpochs(run, model, train_model, criterion, train_loader, val_loader, optimizer, scaler,
                            mixup_fn, shard_eval, start_epoch, best_acc)
    return run_epochs(run, epochs, model, optimizer, scaler, sampler, start_epoch, start_step)


def knn_only(run, model, val_loader) -> int:
    """--knn: k-NN accuracy of the frozen features (train split as the memory bank); knn.json."""
    from engine_finetune import knn_evaluate
    from imagedata.datasets import eval_transform
    args = run.args
    train_set = build_finetune_dataset(args, "train", transform=eval_transform(args.input_size))
    train_loader, _ = make_loader(train_set, args, False, run.world, run.rank, shard=True)
    stats = knn_evaluate(model, train_loader, val_loader, run.device, args.nb_classes, args.knn_k, args.knn_t,
                         args.amp)
    if is_main_process():
        print(f"k-NN (k={args.knn_k}, T={args.knn_t}) on {stats['count']} val images: "
              f"top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%", flush=True)
        with open(Path(args.output_dir) / "knn.json", "w") as f:
            json.dump({**stats, "k": args.knn_k, "t": args.knn_t, "model": args.model, "weights": args.finetune}, f)
        print(summary_line(f"{args.model} k-NN", "completed", time.time() - run.start_time,
                           [f"top-1 {stats['acc1']:.2f}% on {stats['count']} val images"], args.output_dir),
              flush=True)
        run.record.finish("completed", metrics=stats)
    cleanup()
    return 0


def evaluate_only(run, model, val_loader, shard_eval: bool, ckpt) -> int:
    """--eval: top-1/top-5 of the loaded weights on val/; eval.json."""
    args = run.args
    stats = evaluate(model, val_loader, run.device, args.amp, sharded=shard_eval)
    if is_main_process():
        print(f"evaluation of {stats['count']} images: top-1 {stats['acc1']:.3f}%  top-5 {stats['acc5']:.3f}%  "
              f"loss {stats['loss']:.4f}", flush=True)
        write_eval_json(args, stats, ckpt)
        print(summary_line(f"{args.model} evaluation", "completed", time.time() - run.start_time,
                           [f"top-1 {stats['acc1']:.2f}%, top-5 {stats['acc5']:.2f}% on {stats['count']} images"],
                           args.output_dir), flush=True)
        run.record.finish("completed", metrics=stats)
    cleanup()
    return 0


def make_criterion(args):
    """Mixup/CutMix (timm) and the loss that fits it: soft targets, label smoothing, or plain CE."""
    mixup_fn = None
    if not args.linprobe and (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        from timm.data import Mixup
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
    if mixup_fn is not None:
        from timm.loss import SoftTargetCrossEntropy
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing > 0 and not args.linprobe:
        from timm.loss import LabelSmoothingCrossEntropy
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()


class FinetuneEpochs(Epochs):
    """Finetuning's part of the epoch loop (engine.trainer): the supervised epoch, evaluation every
    --eval_freq epochs and after the last, the best checkpoint and the summary."""

    best_key = "best_acc1"

    def __init__(self, run, model, train_model, criterion, train_loader, val_loader, optimizer, scaler, mixup_fn,
                 shard_eval: bool, start_epoch: int, best_acc: float) -> None:
        super().__init__(run, start_epoch, best_acc)
        self.model, self.train_model, self.criterion = model, train_model, criterion
        self.train_loader, self.val_loader, self.optimizer, self.scaler = train_loader, val_loader, optimizer, scaler
        self.mixup_fn, self.shard_eval = mixup_fn, shard_eval
        self.best_epoch, self.train_stats, self.test_stats = None, {}, {}
        self.evaluated = False

    def train(self, epoch: int, start_step: int) -> dict:
        self.train_stats = finetune_one_epoch(self.train_model, self.criterion, self.train_loader, self.optimizer,
                                              self.scaler, self.run.device, epoch, self.args, self.mixup_fn,
                                              self.run.log_writer, stop_flag=self.run.stop, start_step=start_step)
        return self.train_stats

    def evaluate(self, epoch: int, stats: dict, last: bool) -> EpochSave:
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
        self.evaluated = last or (epoch + 1) % self.args.eval_freq == 0
        if not self.evaluated:
            return EpochSave(record)
        test = self.test_stats = evaluate(self.model, self.val_loader, self.run.device, self.args.amp,
                                          sharded=self.shard_eval)
        improved = test["acc1"] > self.best
        self.best = max(self.best, test["acc1"])
        self.best_epoch = epoch if improved else self.best_epoch
        return EpochSave({**record, **{f"test_{k}": v for k, v in test.items()}},
                         extra={"val_acc1": test["acc1"]},
                         extra_names=("checkpoint-best.pth",) if improved else ())

    def log(self, epoch: int, stats: dict, last: bool) -> None:
        if not self.evaluated:
            return
        test, writer = self.test_stats, self.run.log_writer
        print(f"epoch {epoch}: val top-1 {test['acc1']:.2f}%  top-5 {test['acc5']:.2f}%  "
              f"(best {self.best:.2f}%)", flush=True)
        if writer is not None:
            for k in ("acc1", "acc5", "loss"):
                writer.add_scalar(f"val/{k}", test[k], epoch)

    def best_text(self) -> str:
        return f"best top-1 {self.best:.2f}%"

    def finish(self, status: str, last_epoch: int, **extra) -> None:
        parts = [f"last val top-1 {self.test_stats['acc1']:.2f}%"] if self.test_stats else []
        parts.append(f"best val top-1 {self.best:.2f}%" +
                     (f" (epoch {self.best_epoch})" if self.best_epoch is not None else ""))
        if self.train_stats:
            parts.append(f"final train loss {self.train_stats['loss']:.4f}")
        what = f"{self.args.model} {'linear probe' if self.args.linprobe else 'finetuning'}"
        self.run.finish(what, status, self.start_epoch, last_epoch, parts, best_acc1=self.best,
                        best_epoch=self.best_epoch, final_train=self.train_stats or None,
                        final_val=self.test_stats or None, **extra)


def write_eval_json(args, stats: dict, ckpt) -> Path:
    """--eval's result file, eval.json in --output_dir (rewritten by each evaluation)."""
    weights = args.resume or args.finetune or (f"newest checkpoint in {Path(args.output_dir).resolve()}" if ckpt else
                                               "randomly initialised")
    result = {**stats, "model": args.model, "weights": weights, "input_size": args.input_size,
              "nb_classes": args.nb_classes, "data_path": str(Path(args.data_path).resolve()),
              "split": "val", "amp": args.amp, "checkpoint_epoch": ckpt.get("epoch") if ckpt else None}
    path = Path(args.output_dir) / "eval.json"
    tmp = path.with_name(".eval.json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


_validate = validate_args  # the former private name


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
