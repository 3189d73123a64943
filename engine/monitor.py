"""Feature monitors during pretraining: k-NN top-1 and a closed-form linear probe of the current encoder.

At a monitor point (``--monitor_freq`` epochs and after the last one) the pretraining model's encoder
weights are copied into its classifier (the one its checkpoints finetune into, built once with no
head), which embeds a small labelled set in eval mode with the evaluation transform. The features
give

* k-NN top-1 / top-5: the finetuning program's own k-NN (``main_finetune.py --knn``), with the bank
  sharded over the ranks, so the monitor of a checkpoint equals the offline k-NN of that checkpoint;
* a linear probe: ridge regression onto one-hot labels, solved in closed form on the gathered
  features; its strength is chosen by leave-one-out accuracy on the train split (closed form too), so
  the probe draws no random number and needs no steps.

The monitor never touches the training RNGs (every global generator is restored on the way out), so
a run with monitors ends at the weights of the same run without them, and resumes exactly.

The labelled set (``--monitor_data``): the layouts ``main_finetune.py`` reads (train/ and val/ class
folders, train.txt / val.txt lists, labelled tar shards), or one folder of class folders, which is
split once into train and val by a seeded draw per class (``VAL_FRACTION`` of each class, at least one
image). It is listed once at start-up.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

import models
from engine.distributed import is_dist
from engine.loaders import eval_loader
from engine.knn import knn_accuracy, local_features
from errors import DataError, UsageError
from imagedata.datasets import (ImageList, SeededImageDataset, build_finetune_dataset, eval_transform, image_list,
                                is_shard_spec, num_classes_of, report_left_out)
from util.pretrained import load_state

KNN_K, KNN_T = 20, 0.07          # main_finetune.py's --knn_k / --knn_t defaults: the same k-NN
VAL_FRACTION = 0.2               # the val share of each class when the folder has no val split
# ridge strengths, relative to the mean eigenvalue of the centred features' Gram matrix
RIDGE_GRID = tuple(10.0 ** e for e in range(-6, 3))


@dataclass(frozen=True)
class MonitorResult:
    """One monitor point: accuracies in %, the sizes of the split, and its wall time."""
    epoch: int
    knn_acc1: float
    knn_acc5: float
    probe_acc1: float
    probe_ridge: float          # the chosen ridge strength (relative)
    num_train: int
    num_val: int
    seconds: float
    cpu_seconds: float = 0.0    # CPU time of this process (its threads, not DataLoader workers)

    def record(self) -> dict:
        """The log.txt / run-record fields."""
        return {"monitor_knn_acc1": self.knn_acc1, "monitor_knn_acc5": self.knn_acc5,
                "monitor_probe_acc1": self.probe_acc1, "monitor_seconds": round(self.seconds, 3),
                "monitor_cpu_seconds": round(self.cpu_seconds, 3)}

    def line(self) -> str:
        return (f"monitor (epoch {self.epoch}): k-NN top-1 {self.knn_acc1:.2f}%, linear probe top-1 "
                f"{self.probe_acc1:.2f}% on {self.num_val} val / {self.num_train} train images "
                f"({self.seconds:.1f} s)")


@contextlib.contextmanager
def rngs_untouched(device: torch.device) -> Iterator[None]:
    """Run a block without moving any global random generator (torch CPU and ``device``, Python, NumPy)."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def split_monitor_set(path: str, seed: int) -> tuple[ImageList, ImageList] | None:
    """A folder of class folders (no train/val split): a seeded split per class, the same for every
    rank and every start (``VAL_FRACTION`` of each class to val, at least one image, and at least one
    left in train). None when ``path`` has a train split of its own (or is shards)."""
    root = Path(path)
    if is_shard_spec(path):
        return None
    if not root.is_dir():
        raise UsageError(f"--monitor_data {root} does not exist or is not a folder")
    if (root / "train").is_dir() or (root / "train.txt").is_file():
        return None
    try:  # the folder itself as one split of class folders
        whole = image_list(str(root.parent), root.name, labelled=True)
    except DataError as e:
        raise UsageError(f"--monitor_data {root}: expected train/ and val/ class folders, train.txt / val.txt "
                         f"lists, labelled shards, or one folder of class folders ({e})") from None
    report_left_out(whole)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in whole.samples:
        by_class.setdefault(sample[1], []).append(sample)
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in sorted(by_class):
        samples = by_class[label]
        if len(samples) < 2:
            raise UsageError(f"--monitor_data {root}: class {whole.classes[label]!r} holds {len(samples)} image; "
                             f"a train/val split needs at least 2 per class")
        order = torch.randperm(len(samples), generator=gen).tolist()
        n_val = min(max(1, round(VAL_FRACTION * len(samples))), len(samples) - 1)
        val += [samples[i] for i in sorted(order[:n_val])]
        train += [samples[i] for i in sorted(order[n_val:])]
    return ImageList(train, whole.classes), ImageList(val, whole.classes)


def monitor_datasets(path: str, input_size: int, batch_size: int, seed: int):
    """(train set, val set, number of classes, train images, val images), both sets with the
    evaluation transform."""
    split = split_monitor_set(path, seed)
    if split is None:
        try:
            lists = [image_list(path, s, labelled=True) for s in ("train", "val")]
            for images in lists:
                report_left_out(images)
            sets = [build_finetune_dataset(path, s, input_size, batch_size, seed) for s in ("train", "val")]
        except DataError as e:
            raise UsageError(f"--monitor_data: {e}") from None
    else:
        lists, sets = split, []
        for images in split:
            images.min_side = math.ceil(input_size / (224 / 256 if input_size <= 224 else 1.0))
            sets.append(SeededImageDataset(images, eval_transform(input_size)))
    return sets[0], sets[1], max(num_classes_of(images) for images in lists), len(lists[0]), len(lists[1])


def gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows (n_r, ...) concatenated in rank order on every rank (parts may be empty)."""
    if not is_dist():
        return x
    world = dist.get_world_size()
    shape = torch.tensor([x.shape[0], x.shape[1] if x.dim() > 1 else 0], device=x.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    sizes = [int(s[0]) for s in shapes]
    width = max(int(s[1]) for s in shapes)
    rows = max(sizes)
    padded = torch.zeros((rows, width) if x.dim() > 1 else (rows,), dtype=x.dtype, device=x.device)
    if x.shape[0]:
        padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


@torch.no_grad()
def ridge_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
                grid: tuple[float, ...] = RIDGE_GRID) -> tuple[float, float]:
    """Closed-form linear probe: ridge regression of centred one-hot labels on centred features
    (train (n, D) / (n,), val (q, D) / (q,)), its strength picked from ``grid`` (times the mean
    eigenvalue) by leave-one-out top-1 on train (ties: the stronger). Returns (val top-1 %, strength).

    In the eigenbasis of X^T X = V diag(s) V^T every strength costs O(n D C): with Z = X V, the fit is
    Z diag(1/(s+l)) Z^T Y, the leverages h_i = sum_j Z_ij^2 / (s_j + l), and the leave-one-out
    prediction y_i - (y_i - f_i) / (1 - h_i)."""
    x = train_x.double()
    mean = x.mean(0)
    x = x - mean
    y = torch.nn.functional.one_hot(train_y.long(), num_classes).double()
    y_mean = y.mean(0)
    y = y - y_mean
    s, v = torch.linalg.eigh(x.T @ x)
    s = s.clamp(min=0)
    z = x @ v
    zy = z.T @ y
    scale = float(s.mean()) or 1.0
    best_acc, best_l = -1.0, grid[-1]
    for rel in sorted(grid, reverse=True):        # strongest first: ties keep the stronger
        inv = 1.0 / (s + rel * scale)
        fit = z @ (zy * inv[:, None])
        h = (z.square() * inv).sum(1)
        loo = y - (y - fit) / (1 - h).clamp(min=1e-9)[:, None]
        acc = float((loo.argmax(1) == train_y).double().mean())
        if acc > best_acc:
            best_acc, best_l = acc, rel
    inv = 1.0 / (s + best_l * scale)
    scores = ((val_x.double() - mean) @ v) @ (zy * inv[:, None]) + y_mean
    top1 = float((scores.argmax(1) == val_y).double().sum()) * 100.0 / max(len(val_y), 1)
    return top1, best_l


class FeatureMonitor:
    """k-NN and linear-probe accuracy of a pretraining model's encoder on a fixed labelled set;
    ``__call__`` on every rank at a monitor point."""

    def __init__(self, pretrain_model: nn.Module, model_name: str, data: str, input_size: int, batch_size: int,
                 seed: int, workers: int, device: torch.device, world: int, rank: int, amp: str = "none",
                 pin_mem: bool = True) -> None:
        self.pretrain_model, self.device, self.amp = pretrain_model, device, amp
        train, val, self.num_classes, self.num_train, self.num_val = monitor_datasets(data, input_size, batch_size,
                                                                                      seed)
        self.bank = eval_loader(train, batch_size, world, rank, workers, device, pin_mem, shard=True)
        self.queries = eval_loader(val, batch_size, world, rank, workers, device, pin_mem, shard=True)
        with rngs_untouched(device):
            self.encoder = models.create_model(models.classifier_for(model_name), num_classes=0,
                                               img_size=input_size).to(device).eval()
            self.encoder.requires_grad_(False)
            self._copy_weights()   # a model whose encoder does not fit its classifier fails here, at start-up

    def _copy_weights(self) -> None:
        load_state(self.encoder, self.pretrain_model.state_dict(), "the pretraining model")

    @torch.no_grad()
    def __call__(self, epoch: int) -> MonitorResult:
        t0, c0 = time.perf_counter(), time.process_time()
        with rngs_untouched(self.device):
            self._copy_weights()
            bank, bank_labels = local_features(self.encoder, self.bank, self.device, self.amp)
            queries, query_labels = local_features(self.encoder, self.queries, self.device, self.amp)
            knn = knn_accuracy(bank, bank_labels, queries, query_labels, self.num_classes, KNN_K, KNN_T)
            probe, ridge = ridge_probe(gather_rows(bank), gather_rows(bank_labels), gather_rows(queries),
                                       gather_rows(query_labels), self.num_classes)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return MonitorResult(epoch, knn["acc1"], knn["acc5"], probe, ridge, self.num_train, self.num_val,
                             time.perf_counter() - t0, time.process_time() - c0)


def best_of(history: list[MonitorResult]) -> Optional[MonitorResult]:
    """The monitor point with the best k-NN top-1 (the first of equals)."""
    return max(history, key=lambda r: r.knn_acc1, default=None)
