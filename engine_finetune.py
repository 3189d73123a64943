"""Classification's part of the loop (engine.trainer.Task): finetuning and linear probing with
top-1 / top-5 evaluation, --eval, and k-NN evaluation of frozen features."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from config.finetune import FinetuneConfig
from engine.distributed import is_dist
from engine.knn import knn_evaluate
from engine.run import Run
from engine.step import StepOutput, autocast
from engine.trainer import Evaluation, Task


class ClassifyTask(Task):
    """Finetuning or linear probing (--linprobe): the supervised loss with Mixup/CutMix and label
    smoothing where the recipe has them, top-1 / top-5 on val/ every --eval_freq epochs and after
    the last (the best checkpoint among those); also --eval's evaluation of the loaded weights."""

    best_key = "best_acc1"

    def __init__(self, config: FinetuneConfig, model: nn.Module, train_model: nn.Module, run: Run, val_loader,
                 checkpoint: Optional[dict] = None) -> None:
        self.config, self.model, self.train_model, self.run, self.val_loader = config, model, train_model, run, val_loader
        self.checkpoint = checkpoint
        self.what = f"{config.model} {'linear probe' if config.linprobe else 'finetuning'}"
        self.mixup, self.criterion = make_criterion(config)

    def compute_loss(self, batch) -> StepOutput:
        imgs, targets, ok = batch
        device = self.run.device
        imgs, targets = imgs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if self.mixup is not None:
            imgs, targets = self.mixup(imgs, targets)
        loss = self.criterion(self.train_model(imgs), targets)
        return StepOutput(loss, imgs.shape[0], {"skipped_images": int((ok == 0).sum())})

    def evaluate(self, period: Optional[int]) -> Evaluation:
        c = self.config
        stats = evaluate(self.model, self.val_loader, self.run.device, c.amp, sharded=c.dist_eval)
        return Evaluation(stats, stats["acc1"], record={f"test_{k}": v for k, v in stats.items()},
                          checkpoint={"val_acc1": stats["acc1"]})

    def log(self, period: int, stats: dict, evaluation: Optional[Evaluation]) -> None:
        if evaluation is None:
            return
        test, writer = evaluation.metrics, self.run.log_writer
        print(f"epoch {period}: val top-1 {test['acc1']:.2f}%  top-5 {test['acc5']:.2f}%  "
              f"(best {evaluation.best:.2f}%)", flush=True)
        if writer is not None:
            for k in ("acc1", "acc5", "loss"):
                writer.add_scalar(f"val/{k}", test[k], period)

    def best_text(self, best: float) -> str:
        return f"best top-1 {best:.2f}%"

    def finish(self, stats: dict, evaluation: Optional[Evaluation], best: float,
               best_period: Optional[int]) -> tuple[list[str], dict]:
        test = evaluation.metrics if evaluation is not None else {}
        parts = [f"last val top-1 {test['acc1']:.2f}%"] if test else []
        parts.append(f"best val top-1 {best:.2f}%" + (f" (epoch {best_period})" if best_period is not None else ""))
        if stats:
            parts.append(f"final train loss {stats['loss']:.4f}")
        return parts, dict(best_acc1=best, best_epoch=best_period, final_train=stats or None, final_val=test or None)

    def report(self, evaluation: Evaluation) -> tuple[str, list[str]]:
        """--eval: the result, and eval.json in --output_dir (rewritten by each evaluation)."""
        c, stats, ckpt = self.config, evaluation.metrics, self.checkpoint
        print(f"evaluation of {stats['count']} images: top-1 {stats['acc1']:.3f}%  top-5 {stats['acc5']:.3f}%  "
              f"loss {stats['loss']:.4f}", flush=True)
        weights = c.resume or c.finetune or (f"newest checkpoint in {Path(c.output_dir).resolve()}" if ckpt else
                                             "randomly initialised")
        write_json(Path(c.output_dir) / "eval.json",
                   {**stats, "model": c.model, "weights": weights, "input_size": c.input_size,
                    "nb_classes": c.nb_classes, "data_path": str(Path(c.data_path).resolve()), "split": "val",
                    "amp": c.amp, "checkpoint_epoch": ckpt.get("epoch") if ckpt else None})
        return f"{c.model} evaluation", [f"top-1 {stats['acc1']:.2f}%, top-5 {stats['acc5']:.2f}% on "
                                         f"{stats['count']} images"]


class KnnTask(Task):
    """--knn: k-NN accuracy of the frozen features, the train split (evaluation transform) as the
    memory bank; knn.json."""

    def __init__(self, config: FinetuneConfig, model: nn.Module, run: Run, train_loader, val_loader) -> None:
        self.config, self.model, self.run = config, model, run
        self.train_loader, self.val_loader = train_loader, val_loader

    def evaluate(self, period: Optional[int]) -> Evaluation:
        c = self.config
        stats = knn_evaluate(self.model, self.train_loader, self.val_loader, self.run.device, c.nb_classes, c.knn_k,
                             c.knn_t, c.amp)
        return Evaluation(stats, stats["acc1"])

    def report(self, evaluation: Evaluation) -> tuple[str, list[str]]:
        c, stats = self.config, evaluation.metrics
        print(f"k-NN (k={c.knn_k}, T={c.knn_t}) on {stats['count']} val images: "
              f"top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%", flush=True)
        write_json(Path(c.output_dir) / "knn.json",
                   {**stats, "k": c.knn_k, "t": c.knn_t, "model": c.model, "weights": c.finetune})
        return f"{c.model} k-NN", [f"top-1 {stats['acc1']:.2f}% on {stats['count']} val images"]


class LinearProbeHead(nn.Sequential):
    """MAE's probe: BatchNorm without affine parameters, then the linear classifier."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)


def use_linear_probe(model: nn.Module) -> None:
    """MAE's linear probe on ``model``: its final Linear (``contract.head``) behind a BatchNorm without
    affine parameters, re-initialised; every other parameter frozen (a head that normalises before
    its Linear, as Hiera's norm -> fc, keeps that norm, frozen)."""
    path = model.contract.head
    linear = model.get_submodule(path)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    probe = LinearProbeHead(linear)
    owner, _, attr = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, probe)
    trainable = {id(p) for p in probe.parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in trainable


def make_criterion(config: FinetuneConfig):
    """Mixup/CutMix (timm) and the loss that fits it: soft targets, label smoothing, or plain CE."""
    if config.uses_mixup:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, cutmix_minmax=config.cutmix_minmax,
                      prob=config.mixup_prob, switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                      label_smoothing=config.smoothing, num_classes=config.nb_classes)
        return mixup, SoftTargetCrossEntropy()
    if config.smoothing > 0 and not config.linprobe:
        from timm.loss import LabelSmoothingCrossEntropy
        return None, LabelSmoothingCrossEntropy(smoothing=config.smoothing)
    return None, nn.CrossEntropyLoss()


def write_json(path: Path, obj: dict) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


@torch.no_grad()
def evaluate(model, loader, device, amp: str = "none", sharded: bool = False) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader; summed across ranks
    when the loader is ``sharded`` (each rank evaluated its own part)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    for imgs, targets, _ in loader:
        imgs = imgs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(amp, device):
            logits = model(imgs)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(targets.unsqueeze(1))
        totals += torch.stack([
            torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
            hit[:, :1].any(1).sum().double(), hit.any(1).sum().double(),
            torch.tensor(float(len(targets)), dtype=torch.float64, device=device)])
    if sharded and is_dist():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    n = max(n, 1)
    return {"loss": loss / n, "acc1": 100 * top1 / n, "acc5": 100 * top5 / n, "count": int(n)}
