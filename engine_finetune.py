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


@torch.no_grad()
def local_features(model, loader, device, amp: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features (before the head) and labels of this rank's part of the loader,
    not gathered: (n, D) float32, (n,). An empty part gives (0, 0) and (0,)."""
    model.eval()
    feats, labels = [], []
    for imgs, targets, _ in loader:
        with autocast(amp, device):
            f = model.forward_head(model.forward_features(imgs.to(device, non_blocking=True)), pre_logits=True)
        feats.append(torch.nn.functional.normalize(f.float(), dim=1))
        labels.append(targets.to(device))
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_topk(queries, bank, bank_labels, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar bank entries of each query, scanning the bank ``chunk`` rows at a time
    (memory Q x (k + chunk)): similarities (Q, k) and labels (Q, k), sorted, descending. Slots
    beyond the bank's size hold similarity -inf and label -1."""
    q = len(queries)
    best_sim = torch.full((q, k), float("-inf"), device=queries.device, dtype=queries.dtype)
    best_lab = torch.full((q, k), -1, dtype=torch.long, device=queries.device)
    for start in range(0, len(bank), chunk):
        sim = queries @ bank[start:start + chunk].T                                   # (Q, c)
        lab = bank_labels[start:start + chunk].unsqueeze(0).expand(q, -1)
        sim, lab = torch.cat([best_sim, sim], 1), torch.cat([best_lab, lab], 1)
        best_sim, idx = sim.topk(k, dim=1)
        best_lab = lab.gather(1, idx)
    return best_sim, best_lab


def knn_vote(top_sim, top_lab, num_classes: int, t: float) -> torch.Tensor:
    """Weighted vote (weights exp(sim / t)) of the neighbours: class scores (Q, num_classes)."""
    valid = top_lab >= 0
    weights = torch.where(valid, (top_sim / t).exp(), torch.zeros_like(top_sim))
    votes = torch.zeros(len(top_sim), num_classes, device=top_sim.device, dtype=top_sim.dtype)
    return votes.scatter_add_(1, top_lab.clamp(min=0), weights)


@torch.no_grad()
def knn_classify(train_feats, train_labels, query_feats, num_classes: int, k: int = 20, t: float = 0.07,
                 chunk: int = 256, bank_chunk: int = 4096) -> torch.Tensor:
    """Weighted k-NN vote (cosine similarity, weights exp(sim / t)): class scores (Q, num_classes).
    Queries ``chunk`` and bank ``bank_chunk`` rows at a time: at most chunk x (k + bank_chunk) similarities."""
    k = min(k, len(train_feats))
    scores = []
    for start in range(0, len(query_feats), chunk):
        sim, lab = knn_topk(query_feats[start:start + chunk], train_feats, train_labels, k, bank_chunk)
        scores.append(knn_vote(sim, lab, num_classes, t))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=query_feats.device)


@torch.no_grad()
def knn_evaluate(model, train_loader, val_loader, device, num_classes: int, k: int = 20, t: float = 0.07,
                 amp: str = "none", chunk: int = 256, bank_chunk: int = 4096) -> dict:
    """k-NN top-1 / top-5 (%) of frozen features: no reference framework has this evaluation.

    With several ranks both loaders are sharded and the train bank stays sharded: each rank's
    queries are broadcast ``chunk`` at a time, every rank finds the top-k of its own bank part,
    and the per-rank top-k lists are merged into the global top-k (an empty part contributes
    nothing). Memory per rank: its bank part + chunk x (k + bank_chunk) similarities + world x
    chunk x k candidates; nothing of size N_train x N_val or world x bank is ever built.
    """
    bank, bank_labels = local_features(model, train_loader, device, amp)
    queries, query_labels = local_features(model, val_loader, device, amp)
    return knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k, t, chunk, bank_chunk)


@torch.no_grad()
def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes: int, k: int = 20, t: float = 0.07,
                 chunk: int = 256, bank_chunk: int = 4096) -> dict:
    """knn_evaluate on features: this rank's bank part (n, D) / (n,) and queries (q, D) / (q,);
    either may be empty ((0, 0) allowed). Every rank must call it."""
    device = bank.device
    world = dist.get_world_size() if is_dist() else 1
    rank = dist.get_rank() if is_dist() else 0
    sizes = torch.tensor([len(bank), len(queries), bank.shape[1], queries.shape[1]], device=device)
    if world > 1:
        every = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(every, sizes)
        every = torch.stack(every).cpu()
    else:
        every = sizes.view(1, -1).cpu()
    dim = int(every[:, 2:].max())
    k = min(k, int(every[:, 0].sum()))
    if k < 1:
        raise ValueError("k-NN needs at least one training image")
    if len(bank) == 0:
        bank = torch.zeros(0, dim, device=device, dtype=queries.dtype if len(queries) else bank.dtype)
    if len(queries) == 0:
        queries = torch.zeros(0, dim, device=device, dtype=bank.dtype)
    counts = torch.zeros(3, dtype=torch.float64, device=device)    # top-1 hits, top-5 hits, queries
    for src in range(world):
        n_src = int(every[src, 1])
        for start in range(0, n_src, chunk):
            c = min(chunk, n_src - start)
            q = queries[start:start + c] if src == rank else torch.empty(c, dim, device=device, dtype=bank.dtype)
            if world > 1:
                dist.broadcast(q, src)
            sim, lab = knn_topk(q, bank, bank_labels, k, bank_chunk)
            if world > 1:
                sims = [torch.empty_like(sim) for _ in range(world)]
                labs = [torch.empty_like(lab) for _ in range(world)]
                dist.all_gather(sims, sim)
                dist.all_gather(labs, lab)
                sim, idx = torch.cat(sims, 1).topk(k, dim=1)
                lab = torch.cat(labs, 1).gather(1, idx)
            if src == rank:
                scores = knn_vote(sim, lab, num_classes, t)
                top = scores.topk(min(5, num_classes), dim=1).indices
                hit = top.eq(query_labels[start:start + c].unsqueeze(1))
                counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(c, device=device)]).double()
    if world > 1:
        dist.all_reduce(counts)
    top1, top5, n = counts.tolist()
    n_safe = max(n, 1)
    return {"acc1": 100.0 * top1 / n_safe, "acc5": 100.0 * top5 / n_safe, "count": int(n)}
