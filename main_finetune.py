"""Finetuning, linear probing and k-NN evaluation of pretrained encoders, under torchrun.

    torchrun --nproc_per_node=8 main_finetune.py --config recipes/finetune_swin_tiny_256.yaml \
        --finetune ./work_dirs/pretrain_mae_swin_tiny_256/checkpoint-199.pth \
        --data_path /path/to/ImageNet/ --output_dir ...

Modes: default = finetuning; ``--linprobe`` = frozen encoder + BatchNorm (no affine) + linear
head, LARS (main_linprobe.py sets MAE's recipe); ``--knn`` = k-NN accuracy of frozen features;
``--eval`` = evaluate the weights only. Without ``--model`` the classifier is the one the
``--finetune`` checkpoint's model finetunes into. The recipes are in recipes/ and FINETUNE.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from config.cli import ArgumentParser, HelpFormatter, add_common_args, answer_usage_first
from config.pixel_flags import add_pixel_args

DEFAULT_MODEL = "swin_tiny_256"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser("UM-MAE finetuning / linear probing / k-NN", add_help=add_help, formatter_class=HelpFormatter)
    p.add_argument("--batch_size", default=64, type=int, help="images per GPU (effective = batch * accum * GPUs)")
    p.add_argument("--epochs", default=50, type=int, help="length of the schedule")
    p.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--model", default=None, type=str,
                   help=f"classifier name (default: the classifier the --finetune checkpoint's model finetunes "
                        f"into, else {DEFAULT_MODEL})")
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
    add_pixel_args(p, finetune=True)  # --in_chans, --norm_stats (config/pixel_flags.py)
    add_common_args(p)
    return p


# --help and flag errors answer before torch, torchvision and timm load (also for main_linprobe.py)
answer_usage_first(get_args_parser, __name__ == "__main__")

from dataclasses import replace  # noqa: E402
from typing import Optional  # noqa: E402
import torch  # noqa: E402
import models  # noqa: E402
from config.cli import parse, run_main, write_recipe  # noqa: E402
from config.finetune import FinetuneConfig, check_flags, resolve  # noqa: E402
from config.sections import effective_lr, step_settings  # noqa: E402
from engine.checkpoint import stored_model_name, stored_pixels  # noqa: E402
from engine.cpu_perf import setup_cpu_training  # noqa: E402
from engine.distributed import is_main_process  # noqa: E402
from engine.lars import LARS  # noqa: E402
from engine.loaders import TrainLoader, eval_loader, train_loader  # noqa: E402
from engine.optim import make_adamw, param_groups_lrd  # noqa: E402
from engine.run import Run, start_run, wrap_for_training  # noqa: E402
from engine.schedule import CosineSchedule  # noqa: E402
from engine.state import RunFlags, TrainState  # noqa: E402
from engine.step import make_scaler  # noqa: E402
from engine.trainer import Cadence, Periods, Trainer, evaluate_only, require_a_batch  # noqa: E402
from engine_finetune import ClassifyTask, KnnTask, use_linear_probe  # noqa: E402
from errors import DataError, UsageError  # noqa: E402
from imagedata.datasets import (build_finetune_dataset, data_fingerprint, eval_transform,  # noqa: E402
                                finetune_train_transform, image_list, report_left_out)
from imagedata.channels import check_channels  # noqa: E402
from imagedata.normstats import describe as describe_pixels  # noqa: E402
from imagedata.normstats import run_pixels  # noqa: E402
from util.pretrained import load_pretrained  # noqa: E402


def parse_args(argv=None, defaults: dict | None = None) -> FinetuneConfig:
    """Flags -> config: every flag combination that cannot work fails here, before any compute (and
    before launch.slurm submits a job)."""
    return configure(parse(get_args_parser(), argv, Path(__file__).name, defaults))


def configure(flags: argparse.Namespace) -> FinetuneConfig:
    """The config of parsed flags (the model described once, on the meta device; the data listed)."""
    if flags.data_path is None:
        raise UsageError("--data_path is required: a folder with train/ and val/ (ImageNet layout or lists)")
    check_flags(flags)
    flags.model = flags.model or classifier_of(flags.finetune) or DEFAULT_MODEL
    classifiers = models.list_models(task="classify")
    if flags.model not in classifiers:
        hint = " (that is a pretraining model: finetune its checkpoint into the matching classifier)" \
            if models.is_model(flags.model) else ""
        raise UsageError(f"unknown --model {flags.model!r}{hint}; valid classifiers: {', '.join(classifiers)}")
    try:
        contract = models.describe(flags.model, num_classes=0,
                                   **({} if flags.input_size is None else {"img_size": flags.input_size}))
    except ValueError as e:
        raise UsageError(f"--input_size {flags.input_size}: {e}") from None
    try:
        val = image_list(flags.data_path, "val", labelled=True)
        train = None if flags.eval else image_list(flags.data_path, "train", labelled=True)
    except DataError as e:
        raise UsageError(f"{e} (evaluation needs a val split)" if "'val'" in str(e) else str(e)) from None
    for split in (train, val):
        if split is not None:
            report_left_out(split)
    config = resolve(flags, contract, train, val, stored_pixels(flags.finetune) if flags.finetune else None)
    try:
        check_channels(val, config.in_chans)  # the data's channels against --in_chans (or the checkpoint's)
    except DataError as e:
        raise UsageError(str(e)) from None
    return config


def classifier_of(checkpoint: str) -> str | None:
    """The classifier a checkpoint's model finetunes into (itself for a classifier), if it names its model."""
    name = stored_model_name(checkpoint) if checkpoint else None
    if name is None or not models.is_model(name):
        return None
    return models.classifier_for(name) if name in models.list_models(task="pretrain") else name


def main(config: FinetuneConfig) -> int:
    run, config = start_run(config, f"main_finetune ({config.mode})")
    # --in_chans / --norm_stats: the checkpoint's statistics, or those named (auto: of the training set)
    split = "val" if config.eval else "train"
    pixels = run_pixels(config, lambda: image_list(config.data_path, split, labelled=True),
                        log=print if is_main_process() else lambda *a: None)
    config = replace(config, norm_mean=pixels.mean, norm_std=pixels.std)
    run.log(f"pixels: {describe_pixels(pixels)} (--norm_stats {config.norm_stats})")
    val_set = build_finetune_dataset(config.data_path, "val", config.input_size, config.batch_size, config.seed,
                                     pixels=pixels)
    val = eval_loader(val_set, config.batch_size, run.world, run.rank, config.num_workers, run.device, config.pin_mem,
                      shard=config.dist_eval or config.knn)
    model = build_model(config, run.device)
    cpu_note = setup_cpu_training(model, run.device, config.cpu_matmul, malloc=config.cpu_tuning,
                                  compiled=config.compile and config.mode in ("finetune", "linprobe"))
    run.log(cpu_note)
    if config.knn:
        bank = build_finetune_dataset(config.data_path, "train", config.input_size, config.batch_size, config.seed,
                                      transform=eval_transform(config.input_size, pixels), pixels=pixels)
        bank = eval_loader(bank, config.batch_size, run.world, run.rank, config.num_workers, run.device,
                           config.pin_mem, shard=True)
        return evaluate_only(run, KnnTask(config, model, run, bank, val))
    config = replace(config, lr=effective_lr(config, run.world))
    loader, data = classification_loader(config, run) if not config.eval else (None, None)
    state = TrainState(RunFlags.of(config), model, make_optimizer(config, model, run.device),
                       make_scaler(config.amp, run.device), best_key=ClassifyTask.best_key, data=data)
    state.resume(log=lambda *a, **k: print(*a, **k) if is_main_process() else None)
    if config.eval:
        return evaluate_only(run, ClassifyTask(config, model, model, run, val, state.checkpoint))
    state.train_model = wrap_for_training(model, run, config.compile)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.note(f"{config.model}: {count_text(n_train)} trainable parameters; {config.num_train} train / "
             f"{config.num_val} val images; lr {config.lr:.3e}; amp {config.amp}; mode "
             f"{'linear probe' if config.linprobe else 'finetune'}; world {run.world}",
             cpu=cpu_note or None, start={"epoch": state.epoch, "step": state.step}, lr=config.lr,
             num_train=config.num_train,
             num_val=config.num_val, nb_classes=config.nb_classes, in_chans=pixels.in_chans,
             norm_mean=list(pixels.mean), norm_std=list(pixels.std))
    write_recipe(config, run.rank)
    task = ClassifyTask(config, model, state.train_model, run, val)
    steps = len(loader)
    return Trainer(run, state, task, loader, CosineSchedule(config.lr, config.min_lr, config.warmup_epochs, config.epochs),
                   Periods(steps, steps * config.epochs), step_settings(config), evaluate=Cadence(config.eval_freq * steps),
                   save=Cadence(config.save_freq * steps), exit_after=config.exit_after_epoch).fit()


def count_text(n: int) -> str:
    """A parameter count as people read it: millions from one million on, else the exact number (a linear
    probe's head is thousands, which '0.00M' hid)."""
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n:,}"


def build_model(config: FinetuneConfig, device: torch.device) -> torch.nn.Module:
    """The classifier (with MAE's linear-probe head for --linprobe, swapped first so that a linear-probe
    checkpoint loads its head and BN statistics) and the --finetune weights, unless resuming."""
    model = models.create_model(config.model, **config.model_kwargs(models.describe_class(config.model).build_options))
    if config.linprobe:
        use_linear_probe(model)
    if config.finetune and not config.resume:
        report = load_pretrained(model, config.finetune)
        if is_main_process():
            print(report.summary(), flush=True)
    return model.to(device)


def make_optimizer(config: FinetuneConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if config.linprobe:  # MAE's probe optimizer: momentum 0.9, trust 0.001, 1-D tensors not decayed or adapted
        return LARS([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
    return make_adamw(param_groups_lrd(model, config.weight_decay, config.layer_decay), config.lr, device)


def classification_loader(config: FinetuneConfig, run: Run) -> tuple[TrainLoader, Optional[dict]]:
    """The training loader, and the fingerprint of its shards (None for image folders) for checkpoints."""
    transform = finetune_train_transform(config.input_size, config.color_jitter, config.min_crop_scale, config.aa,
                                         config.reprob, config.remode, config.recount, config.pixels)
    train_set = build_finetune_dataset(config.data_path, "train", config.input_size, config.batch_size, config.seed,
                                       transform=transform, training=True, world=run.world, rank=run.rank,
                                       pixels=config.pixels)
    loader = train_loader(train_set, config.batch_size, run.world, run.rank, config.seed, config.num_workers,
                          run.device, config.pin_mem)
    require_a_batch(len(loader), len(train_set), config.batch_size, run.world)
    return loader, data_fingerprint(train_set)


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
