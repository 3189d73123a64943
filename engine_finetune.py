"""Finetuning epoch (Mixup/CutMix + the shared step loop) and top-1 / top-5 evaluation."""
from __future__ import annotations

import torch
import torch.distributed as dist

from util.distributed import is_dist
from util.loop import autocast, train_one_epoch


def finetune_one_epoch(model, criterion, loader, optimizer, scaler, device, epoch, args, mixup_fn=None,
                       log_writer=None, stop_flag=None, start_step: int = 0) -> dict:
    def compute_loss(batch):
        imgs, targets, ok = batch
        imgs = imgs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            imgs, targets = mixup_fn(imgs, targets)
        loss = criterion(model(imgs), targets)
        return loss, imgs.shape[0], {"skipped_images": int((ok == 0).sum())}

    return train_one_epoch(model, loader, optimizer, scaler, device, epoch, args, compute_loss,
                           log_writer=log_writer, header=f"Epoch [{epoch}]", stop_flag=stop_flag,
                           start_step=start_step)


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
def extract_features(model, loader, device, amp: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features (before the head) and labels; with several ranks the loader
    must be sharded (ShardSampler) and the parts are gathered."""
    model.eval()
    feats, labels = [], []
    for imgs, targets, _ in loader:
        with autocast(amp, device):
            f = model.forward_head(model.forward_features(imgs.to(device, non_blocking=True)), pre_logits=True)
        feats.append(torch.nn.functional.normalize(f.float(), dim=1))
        labels.append(targets.to(device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if is_dist():
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(feats)], device=device))
        top = int(max(s.item() for s in sizes))
        pad = lambda t: torch.cat([t, t.new_zeros((top - len(t),) + t.shape[1:])])
        fs = [torch.zeros_like(pad(feats)) for _ in range(world)]
        ls = [torch.zeros_like(pad(labels)) for _ in range(world)]
        dist.all_gather(fs, pad(feats))
        dist.all_gather(ls, pad(labels))
        feats = torch.cat([f[: int(s.item())] for f, s in zip(fs, sizes)])
        labels = torch.cat([l[: int(s.item())] for l, s in zip(ls, sizes)])
    return feats, labels


@torch.no_grad()
def knn_classify(train_feats, train_labels, query_feats, num_classes: int, k: int = 20, t: float = 0.07,
                 chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN vote (cosine similarity, weights exp(sim / t)): class scores (Q, num_classes)."""
    k = min(k, len(train_feats))
    scores = []
    for start in range(0, len(query_feats), chunk):
        sim = query_feats[start:start + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / t).exp()
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


@torch.no_grad()
def knn_evaluate(model, train_loader, val_loader, device, num_classes: int, k: int = 20, t: float = 0.07,
                 amp: str = "none") -> dict:
    """k-NN top-1 / top-5 (%) of frozen features: no reference framework has this evaluation."""
    train_feats, train_labels = extract_features(model, train_loader, device, amp)
    val_feats, val_labels = extract_features(model, val_loader, device, amp)
    scores = knn_classify(train_feats, train_labels, val_feats, num_classes, k, t)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top.eq(val_labels.unsqueeze(1))
    n = max(len(val_labels), 1)
    return {"acc1": 100.0 * hit[:, 0].float().sum().item() / n, "acc5": 100.0 * hit.any(1).float().sum().item() / n,
            "count": len(val_labels)}
