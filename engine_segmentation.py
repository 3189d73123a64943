"""Segmentation's part of the loop (engine.trainer.Task): the UperNet loss, evaluation after every
interval (a confusion matrix over the validation set), the best mIoU, and --eval."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from config.segmentation import SegmentConfig
from engine.distributed import is_dist
from engine.run import Run
from engine.step import StepOutput, autocast
from engine.trainer import Evaluation, Task
from segmentation.inference import predict
from segmentation.metrics import confusion_matrix, segmentation_metrics


class SegmentTask(Task):
    """UperNet (+ FCN auxiliary head) on a classifier backbone: the segmentation loss, mIoU / mAcc /
    aAcc after every evaluation interval (each mode of --test_mode), the best mIoU."""

    best_key = "best_miou"

    def __init__(self, config: SegmentConfig, model: nn.Module, train_model: nn.Module, run: Run, val_loader,
                 class_names) -> None:
        self.config, self.model, self.train_model, self.run = config, model, train_model, run
        self.val_loader, self.class_names = val_loader, class_names
        self.what = f"{config.model} UperNet segmentation"

    def compute_loss(self, batch) -> StepOutput:
        imgs, labels, ok = batch
        device = self.run.device
        loss, _ = self.train_model(imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        return StepOutput(loss, imgs.shape[0], {"skipped_images": int((ok == 0).sum())})

    def evaluate(self, period: Optional[int]) -> Evaluation:
        c = self.config
        modes = ("slide", "whole") if c.test_mode == "both" else (c.test_mode,)
        results = {m: evaluate(self.model, self.val_loader, self.run.device, c.nb_classes, self.class_names, m,
                               c.input_size, c.test_stride, c.amp, sharded=True) for m in modes}
        if period is None:
            return Evaluation(results)
        done = self.iteration(period)
        miou = next(iter(results.values()))["mIoU"] or 0.0
        record = {"iteration": done, **{f"{m}_{k}": r[k] for m, r in results.items() for k in ("mIoU", "mAcc", "aAcc")}}
        return Evaluation(results, miou, record=record, checkpoint={"val_miou": miou, "iteration": done})

    def iteration(self, period: int) -> int:
        """Iterations done at the end of evaluation interval ``period``."""
        return min((period + 1) * self.config.eval_interval, self.config.iters)

    def log(self, period: int, stats: dict, evaluation: Optional[Evaluation]) -> None:
        done, results = self.iteration(period), evaluation.metrics
        print(f"iteration {done}: {summary(results)} (best mIoU {100 * evaluation.best:.2f})", flush=True)
        write_json(Path(self.config.output_dir) / f"eval_iter_{done}.json", {"iteration": done, **results})
        writer = self.run.log_writer
        if writer is not None:
            for m, r in results.items():
                for k in ("mIoU", "mAcc", "aAcc"):
                    if r[k] is not None:  # the step loop's x axis: (period + fraction) x 1000
                        writer.add_scalar(f"val_{m}/{k}", r[k], (period + 1) * 1000)

    def best_text(self, best: float) -> str:
        return f"best mIoU {100 * best:.2f}"

    def finish(self, stats: dict, evaluation: Optional[Evaluation], best: float,
               best_period: Optional[int]) -> tuple[list[str], dict]:
        results = evaluation.metrics if evaluation is not None else {}
        parts = [f"last {summary(results)}"] if results else []
        parts.append(f"best mIoU {100 * best:.2f}")
        return parts, dict(best_miou=best, final_train=stats or None, final_val=results or None)

    def report(self, evaluation: Evaluation) -> tuple[str, list[str]]:
        """--eval: mIoU / mAcc / aAcc of the loaded weights on the validation split; eval.json."""
        c, results = self.config, evaluation.metrics
        print(f"evaluation: {summary(results)}", flush=True)
        write_json(Path(c.output_dir) / "eval.json", {"weights": c.resume or c.finetune or "latest", **results})
        return f"{c.model} segmentation evaluation", [summary(results)]


def summary(results: dict) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    return "; ".join(f"{m}: mIoU {pct(r['mIoU'])} mAcc {pct(r['mAcc'])} aAcc {pct(r['aAcc'])} "
                     f"({r['images']} images)" for m, r in results.items())


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


@torch.no_grad()
def evaluate(model, loader, device, num_classes: int, class_names, mode: str = "slide", crop: int = 512,
             stride: int = 341, amp: str = "none", sharded: bool = False) -> dict:
    """mIoU / mAcc / aAcc / per-class IoU over the loader (batch 1: images keep their sizes).
    Predictions are made at the test scale and resized to the original labels; confusion matrices
    of sharded ranks are summed (each image counted once)."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    counts = torch.zeros(2, dtype=torch.long, device=device)  # evaluated, unreadable
    for img, label, ok in loader:
        if not int(ok[0]):
            counts[1] += 1
            continue
        with autocast(amp, device):
            pred = predict(model, img.to(device, non_blocking=True), num_classes, mode, crop, stride,
                           out_size=label.shape[-2:])
        cm += confusion_matrix(pred[0], label[0].to(device), num_classes)
        counts[0] += 1
    if sharded and is_dist():
        dist.all_reduce(cm)
        dist.all_reduce(counts)
    out = segmentation_metrics(cm, class_names)
    out.update(mode=mode, images=int(counts[0]), unreadable=int(counts[1]))
    if mode == "slide":
        out.update(crop=crop, stride=stride)
    return out
