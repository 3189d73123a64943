"""Object detection / instance segmentation finetuning on COCO, under torchrun (DETECTION.md).

    torchrun --nproc_per_node=8 main_detection.py --detector gfl --model swin_tiny_256 \
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
import functools
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import models
from dense.backbone import build_backbone, dense_param_groups, has_pyramid
from dense.coco import CocoDetection, check_layout, coco_evaluate, collate, load_coco, to_coco_results
from dense.detector import DETECTORS, build_detector
from util.cli import UsageError, add_common_args, check_output_dirs, finalize_common_args, run_main
from util.cpu_perf import setup_cpu_training
from util.datasets import DataError, SeededSampler, ShardSampler
from util.distributed import cleanup, get_world_size, is_dist, is_main_process, wait_for_main_process
from util.loop import autocast, fused_optimizer_ok, make_scaler, train_one_epoch
from util.run import EpochSave, Epochs, require_a_batch, run_epochs, start_run, wrap_for_training
from util.run_record import summary_line
from util.stop import ignore_stop_signals
from util.train_state import resume_training_state


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("UM-MAE detection finetuning (GFL / Mask R-CNN, COCO)", add_help=add_help)
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
    p.add_argument("--eval", action="store_true", help="evaluate only")
    p.add_argument("--eval_freq", type=int, default=1, help="evaluate every N epochs (and after the last)")
    add_common_args(p)
    p.set_defaults(save_freq=5, print_freq=50)
    return p


def _validate(args) -> None:
    classifiers = models.list_models(task="classify")
    if args.model not in classifiers:
        raise UsageError(f"unknown --model {args.model!r}; valid backbones are classifiers: {', '.join(classifiers)}")
    with torch.device("meta"):
        meta = models.create_model(args.model, num_classes=0)
    if not has_pyramid(meta):
        raise UsageError(f"--model {args.model} has no feature pyramid for dense prediction (Swin, PVT and ViT "
                         f"classifiers have one)")
    for flag in ("batch_size", "epochs", "accum_iter", "input_size", "fpn_dim", "adapter_dim", "eval_freq"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    lo, hi = args.ratio_range
    if not 0 < lo <= hi:
        raise UsageError(f"--ratio_range needs 0 < low <= high, got {lo} {hi}")
    if min(args.test_size) < 1:
        raise UsageError(f"--test_size must be positive, got {args.test_size}")
    if args.fpn_dim % 32 and args.neck_norm == "gn":
        raise UsageError(f"--neck_norm gn needs --fpn_dim divisible by 32, got {args.fpn_dim}")
    if args.finetune and not Path(args.finetune).is_file():
        raise UsageError(f"--finetune checkpoint {args.finetune} does not exist")
    if args.resume and not Path(args.resume).is_file():
        raise UsageError(f"--resume checkpoint {args.resume} does not exist")
    if args.eval and args.finetune:
        args.auto_resume = False
    if args.data_path is None:
        raise UsageError("--data_path is required: a COCO folder with annotations/instances_{train,val}2017.json, "
                         "train2017/ and val2017/")
    try:
        check_layout(args.data_path, ["val"] if args.eval else ["train", "val"])
    except DataError as e:
        raise UsageError(str(e)) from None
    check_output_dirs(args)


def parse_args(argv=None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    finalize_common_args(args)
    _validate(args)
    return args


def _to(t: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in t.items()}


def gather_to_main(obj) -> list:
    """Every rank's ``obj``, in rank order, on rank 0 (the others get [])."""
    if not is_dist():
        return [obj]
    parts = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, parts, dst=0)
    return parts if is_main_process() else []


@torch.no_grad()
def evaluate(model, loader, device, dataset: CocoDetection, amp: str = "none", with_masks: bool = False
             ) -> tuple[dict, int]:
    """COCO box (and mask) AP of ``loader``'s images (one image per batch: an image's detections never
    depend on a batch partner's padding, so neither do the numbers on --batch_size or the world size).

    Each rank predicts its shard and turns the detections into COCO results (masks pasted at the
    original size and thresholded on the device, then RLE-encoded); rank 0 gathers them, loads the
    ground truth and runs pycocotools. Unreadable images (named by the loader) are left out of the
    scoring. Returns ({"bbox": {AP, ...}, ["segm": ...]}, unreadable images) on rank 0, ({}, 0) elsewhere."""
    model.eval()
    results, unreadable = [], []
    for imgs, _, metas in loader:
        readable = [k for k, m in enumerate(metas) if "error" not in m]
        unreadable += [m["image_id"] for m in metas if "error" in m]
        if not readable:
            continue
        with autocast(amp, device):
            dets = model(imgs[readable].to(device, non_blocking=True), [metas[k]["size"] for k in readable])
        for det, k in zip(dets, readable):
            results += to_coco_results(det, metas[k], dataset.cat_ids, with_masks)
    parts = gather_to_main((results, unreadable))
    if not is_main_process():
        return {}, 0
    results = [r for part, _ in parts for r in part]
    missing = {i for _, part in parts for i in part}
    scored = [i for i in dataset.ids.tolist() if i not in missing]
    coco_gt = load_coco(dataset.ann_file)  # rank 0, for this scoring only
    return coco_evaluate(coco_gt, results, ["bbox", "segm"] if with_masks else ["bbox"], scored), len(missing)


def _loader(dataset, args, train: bool, world: int, rank: int, divisor: int):
    sampler = (SeededSampler(dataset, world, rank, seed=args.seed, shuffle=True, drop_last=True) if train
               else ShardSampler(len(dataset), world, rank))
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size if train else 1, shuffle=False,
                      num_workers=args.num_workers, collate_fn=functools.partial(collate, size_divisor=divisor),
                      pin_memory=args.pin_mem and args.device.startswith("cuda"), drop_last=train,
                      persistent_workers=train and args.num_workers > 0, worker_init_fn=ignore_stop_signals), sampler


def _log(*a, **k) -> None:
    if is_main_process():
        print(*a, **{"flush": True, **k})


def _summary(stats: dict, unreadable: int = 0) -> str:
    text = "  ".join(f"{t} AP {s['AP'] * 100:.1f} AP50 {s['AP50'] * 100:.1f} AP75 {s['AP75'] * 100:.1f}"
                     for t, s in stats.items())
    return text + (f" ({unreadable} unreadable images not scored)" if unreadable else "")


def main(args) -> int:
    run = start_run(args, f"main_detection ({'eval' if args.eval else 'train'})")
    device, rank, world = run.device, run.rank, run.world
    with_masks = args.detector == "mask_rcnn"
    kw = dict(input_size=args.input_size, ratio_range=args.ratio_range, test_size=args.test_size,
              with_masks=with_masks)
    try:
        train_set = None if args.eval else CocoDetection(args.data_path, "train", train=True, **kw)
        cats = train_set.cat_ids if train_set is not None else None
        val_set = CocoDetection(args.data_path, "val", train=False, categories=cats, **kw)
    except DataError as e:
        raise UsageError(str(e)) from None
    for ds in (train_set, val_set):
        if ds is not None and ds.skipped_summary():
            _log(ds.skipped_summary())
    if train_set is not None and len(train_set) == 0:
        raise UsageError(f"{args.data_path}: no training image has a usable box")
    num_classes = len(val_set.cat_ids)

    backbone = build_backbone(args.model, args.finetune, drop_path=args.drop_path, log=_log)
    model = build_detector(args.detector, backbone, num_classes, adapter_dim=args.adapter_dim, fpn_dim=args.fpn_dim,
                           neck_norm=args.neck_norm, score_thr=args.score_thr, max_per_img=args.max_dets)
    if args.distributed and device.type == "cuda" and args.neck_norm == "bn":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    cpu_note = setup_cpu_training(model, device, args.cpu_matmul, compiled=args.compile and not args.eval)
    if cpu_note:
        _log(cpu_note)

    divisor = backbone.size_divisor
    val_loader, _ = _loader(val_set, args, False, world, rank, divisor)
    groups = dense_param_groups(model, backbone, args.weight_decay, args.layer_decay, rule="mmdet")
    for g in groups:
        g.pop("param_names", None)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=fused_optimizer_ok(device) or None)
    scaler = make_scaler(args.amp, device)
    start_epoch, start_step, ckpt = resume_training_state(args, model, optimizer, scaler, log=_log)
    best_ap = float(ckpt.get("best_ap", 0.0)) if ckpt else 0.0

    if args.eval:
        return evaluate_only(run, model, val_loader, val_set, with_masks)

    train_loader, sampler = _loader(train_set, args, True, world, rank, divisor)
    require_a_batch(len(train_loader), len(train_set), args, world)
    # the shared loop's schedule is in epochs: warmup iterations and the cosine floor converted
    steps_per_epoch = len(train_loader) / args.accum_iter
    args.warmup_epochs = args.warmup_iters / steps_per_epoch
    args.min_lr = args.lr * args.min_lr_ratio
    train_model = wrap_for_training(model, args, device)
    if is_main_process():
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{args.detector} on {args.model}: {n_params / 1e6:.2f}M parameters; {num_classes} classes; "
              f"{len(train_set)} train / {len(val_set)} val images; lr {args.lr:.3e}; amp {args.amp}; "
              f"world {world}", flush=True)
    run.open_log_writer()
    run.record.note(start={"epoch": start_epoch, "step": start_step}, num_train=len(train_set),
                    num_val=len(val_set), num_classes=num_classes, cpu=cpu_note or None)
    epochs = DetectionEpochs(run, model, train_model, train_loader, val_loader, val_set, optimizer, scaler,
                             with_masks, start_epoch, best_ap)
    return run_epochs(run, epochs, model, optimizer, scaler, sampler, start_epoch, start_step)


def evaluate_only(run, model, val_loader, val_set, with_masks: bool) -> int:
    """--eval: COCO AP of the loaded weights on val2017; eval.json."""
    args = run.args
    stats, unreadable = evaluate(model, val_loader, run.device, val_set, args.amp, with_masks)
    if is_main_process():
        _log(f"evaluation of {len(val_set) - unreadable} images: {_summary(stats, unreadable)}")
        (Path(args.output_dir) / "eval.json").write_text(
            json.dumps({"weights": args.resume or args.finetune, **stats, "unreadable_images": unreadable}, indent=1))
        print(summary_line(f"{args.detector} on {args.model} evaluation", "completed", time.time() - run.start_time,
                           [_summary(stats, unreadable)], args.output_dir), flush=True)
        run.record.finish("completed", metrics=stats)
    wait_for_main_process(args.dist_timeout)  # rank 0 scored alone
    cleanup()
    return 0


class DetectionEpochs(Epochs):
    """Detection's part of the loop (util.run): the detector's losses through the step loop, COCO
    evaluation every --eval_freq epochs and after the last, the best box AP."""

    best_key = "best_ap"

    def __init__(self, run, model, train_model, train_loader, val_loader, val_set, optimizer, scaler,
                 with_masks: bool, start_epoch: int, best_ap: float) -> None:
        super().__init__(run, start_epoch, best_ap)
        self.model, self.train_model = model, train_model
        self.train_loader, self.val_loader, self.val_set = train_loader, val_loader, val_set
        self.optimizer, self.scaler, self.with_masks = optimizer, scaler, with_masks
        self.stats: dict = {}
        self.unreadable = 0
        self.train_stats: dict = {}
        self._terms: dict = {}  # the loss terms summed on the device over the epoch's steps
        self._steps = 0

    def compute_loss(self, batch):
        imgs, targets, metas = batch
        device = self.run.device
        losses = self.train_model(imgs.to(device, non_blocking=True), [m["size"] for m in metas],
                                  [_to(t, device) for t in targets])
        for k, v in losses.items():  # kept on the device: no host sync per step
            self._terms[k] = self._terms.get(k, 0) + v.detach().float()
        self._steps += 1
        return sum(losses.values()), imgs.shape[0], {"skipped_images": sum(m.get("replaced", 0) for m in metas)}

    def train(self, epoch: int, start_step: int) -> dict:
        self._terms, self._steps = {}, 0
        stats = train_one_epoch(self.train_model, self.train_loader, self.optimizer, self.scaler, self.run.device,
                                epoch, self.args, self.compute_loss, log_writer=self.run.log_writer,
                                header=f"Epoch [{epoch}]", stop_flag=self.run.stop, start_step=start_step)
        if self._terms:  # each term's mean over this run's steps and over ranks: one transfer per epoch
            names = sorted(self._terms)
            sums = torch.stack([self._terms[k] for k in names]).double()
            if is_dist():
                dist.all_reduce(sums)
            stats.update({k: v / (self._steps * self.run.world) for k, v in zip(names, sums.tolist())})
        self.train_stats = stats
        return stats

    def evaluate(self, epoch: int, stats: dict, last: bool) -> EpochSave:
        self.stats, self.unreadable = {}, 0
        if last or (epoch + 1) % self.args.eval_freq == 0:
            self.stats, self.unreadable = evaluate(self.model, self.val_loader, self.run.device, self.val_set,
                                                   self.args.amp, self.with_masks)
        improved = bool(self.stats) and self.stats["bbox"]["AP"] > self.best
        if self.stats:
            self.best = max(self.best, self.stats["bbox"]["AP"])
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
                  **{f"test_{t}_{k}": v for t, s in self.stats.items() for k, v in s.items()}}
        if self.unreadable:
            record["test_unreadable_images"] = self.unreadable
        return EpochSave(record, extra_names=("checkpoint-best.pth",) if improved else ())

    def log(self, epoch: int, stats: dict, last: bool) -> None:
        if self.stats:
            print(f"epoch {epoch}: {_summary(self.stats, self.unreadable)} (best box AP {self.best * 100:.1f})",
                  flush=True)
            (Path(self.args.output_dir) / f"eval_epoch{epoch}.json").write_text(
                json.dumps({"epoch": epoch, **self.stats, "unreadable_images": self.unreadable}, indent=1))
        writer = self.run.log_writer
        if writer is not None:
            for t, s in self.stats.items():
                for k in ("AP", "AP50", "AP75"):
                    writer.add_scalar(f"val/{t}_{k}", s[k], epoch)
            for k in [k for k in stats if k.startswith("loss_")]:
                writer.add_scalar(f"epoch/{k}", stats[k], epoch)

    def best_text(self) -> str:
        return f"best box AP {self.best * 100:.1f}"

    def finish(self, status: str, last_epoch: int, **extra) -> None:
        parts = [f"last {_summary(self.stats)}"] if self.stats else []
        parts.append(f"best box AP {self.best * 100:.1f}")
        self.run.finish(f"{self.args.detector} on {self.args.model}", status, self.start_epoch, last_epoch, parts,
                        best_ap=self.best, final_train=self.train_stats or None, final_val=self.stats or None,
                        **extra)


validate_args = _validate  # the public name util/slurm.py calls


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
