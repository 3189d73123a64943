"""The one place that builds the programs' data loaders.

Every loader gets the same worker set-up (workers ignore the stop signals, which the ranks own:
engine.stop.ignore_stop_signals), pins memory only for a CUDA device, and keeps its workers
between epochs only for training. A training loader is a ``TrainLoader``: it can start any period
part-way, which is how a run resumed mid-epoch continues at the very sample it stopped at.

What a training sampler must offer (``Resumable``): ``set_epoch(period)`` and ``skip``, the items
of the period already consumed. ``SeededSampler`` (image folders), ``IterationSampler``
(segmentation) and ``ShardStream`` (tar shards, its own sampler) do.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.stop import ignore_stop_signals
from imagedata.datasets import SeededSampler, ShardSampler
from imagedata.shards import ShardStream, shard_loader


class Resumable(Protocol):
    skip: int

    def set_epoch(self, epoch: int) -> None: ...


class TrainLoader:
    """A training loader that starts a period at any micro-step: ``start(period, step)`` returns
    the batches of micro-steps ``step`` .. the end of ``period``."""

    def __init__(self, loader: Iterable, sampler: Resumable, batch_size: int) -> None:
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size

    def start(self, period: int, step: int = 0) -> Iterable:
        self.sampler.set_epoch(period)
        self.sampler.skip = step * self.batch_size
        return self.loader

    def __len__(self) -> int:
        """Micro-steps of the period as started (a whole period before any ``start``)."""
        return len(self.loader)


def train_loader(dataset: Dataset, batch_size: int, world: int, rank: int, seed: int, workers: int,
                 device: torch.device, pin_mem: bool = True, collate: Optional[Callable] = None,
                 sampler: Optional[Sampler] = None, wrap: Optional[Callable] = None) -> TrainLoader:
    """Shuffled, seeded per sample and split over the ranks (``SeededSampler``, or ``sampler``);
    full batches only. A ``ShardStream`` splits, shuffles and batches itself. ``wrap`` wraps the
    DataLoader (e.g. imagedata.decode.GpuDecodeLoader)."""
    pin = pin_mem and device.type == "cuda"
    if isinstance(dataset, ShardStream):
        dataset.world, dataset.rank = world, rank
        loader, sampler = shard_loader(dataset, workers, pin, ignore_stop_signals), dataset
    else:
        sampler = sampler or SeededSampler(dataset, world, rank, seed=seed, shuffle=True, drop_last=True)
        loader = DataLoader(dataset, sampler=sampler, batch_size=batch_size, shuffle=False, num_workers=workers,
                            pin_memory=pin, drop_last=True, persistent_workers=workers > 0,
                            worker_init_fn=ignore_stop_signals, collate_fn=collate)
    return TrainLoader(wrap(loader) if wrap else loader, sampler, batch_size)


def eval_loader(dataset: Dataset, batch_size: int, world: int, rank: int, workers: int, device: torch.device,
                pin_mem: bool = True, shard: bool = True, collate: Optional[Callable] = None) -> Iterable:
    """In order; with ``shard`` each rank reads its own part (every item once over the ranks:
    ``ShardSampler``), else every rank reads the whole set."""
    pin = pin_mem and device.type == "cuda"
    if isinstance(dataset, ShardStream):
        dataset.world, dataset.rank = (world, rank) if shard else (1, 0)
        return shard_loader(dataset, workers, pin, ignore_stop_signals)
    sampler = ShardSampler(len(dataset), world, rank) if shard else None
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin, drop_last=False, persistent_workers=False, worker_init_fn=ignore_stop_signals,
                      collate_fn=collate)
