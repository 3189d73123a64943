"""k-NN evaluation of frozen features, shared by finetuning's ``--knn`` (engine_finetune.KnnTask)
and the pretraining monitors (engine/monitor.py): pooled, L2-normalised features and a weighted
vote over the k most similar training images, with the bank sharded over ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.distributed import is_dist
from engine.step import autocast


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
