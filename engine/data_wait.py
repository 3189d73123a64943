"""How long the training loop waits for its next batch.

``DataWait.wrap(batches)`` times each ``next()`` on the loader's iterator: the wall time the loop
spends blocked on data (DataLoader workers behind, the first batch of an epoch while workers
start). Its share of the wall time goes to the progress line (since the previous line), to the
epoch's statistics (``data_wait_s``, ``data_wait_share``: log.txt's ``train_data_wait_*``), and
to TensorBoard (``train/data_wait_share``, ``epoch/data_wait_share``); over ``WARN_SHARE`` of an
epoch and at least ``WARN_SECONDS`` earns a one-line warning, whose advice names only what the program
offers (``StepSettings.data_advice``). In a distributed run the epoch figure is the largest over ranks
(the slowest rank's loader holds every rank back at the next all-reduce).

On a GPU the step's kernels run asynchronously, so host time between batches is not GPU time;
over a logging interval (which synchronises) and over an epoch the share is what it says: the
part of the wall time in which the loop could not proceed for lack of a batch.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch

WARN_SHARE = 0.10
# a share alone fires on tiny epochs (a tenth of a 2-second epoch is the workers starting): the wait
# must also be long enough to be worth acting on
WARN_SECONDS = 1.0
DEFAULT_ADVICE = "raise --num_workers"


class DataWait:
    def __init__(self) -> None:
        self.total = 0.0      # seconds waited this epoch
        self.last = 0.0       # seconds waited by the latest step
        self._mark_wait = 0.0
        self._start = self._mark = time.perf_counter()

    def wrap(self, batches: Iterable) -> Iterator:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.last = time.perf_counter() - t0
            self.total += self.last
            yield batch

    def interval_share(self) -> float:
        """Share of the wall time spent waiting since the previous call (the previous progress line)."""
        now = time.perf_counter()
        share = (self.total - self._mark_wait) / max(now - self._mark, 1e-9)
        self._mark, self._mark_wait = now, self.total
        return share

    def epoch_stats(self, device: torch.device) -> dict:
        """{"data_wait_s", "data_wait_share"} of the epoch so far, the largest over ranks."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        vals = torch.tensor([self.total, self.total / elapsed], dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(vals, op=torch.distributed.ReduceOp.MAX)
        wait, share = vals.tolist()
        return {"data_wait_s": wait, "data_wait_share": share}


def warning(stats: dict, period: str, num_workers, advice: str = DEFAULT_ADVICE) -> str | None:
    """The one-line warning for a period (``period``: its name, e.g. 'epoch 3' or 'iterations 0-500')
    that waited more than WARN_SHARE of its time and WARN_SECONDS for data; ``advice``: what this
    program can do about it."""
    share, seconds = stats.get("data_wait_share", 0.0), stats.get("data_wait_s", 0.0)
    if share <= WARN_SHARE or seconds < WARN_SECONDS:
        return None
    return (f"warning: {period} waited {share:.0%} of its time for data ({seconds:.1f} s; "
            f"--num_workers {num_workers}): {advice}")
