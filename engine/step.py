"""The micro-step body every program trains with: one period (an epoch, or segmentation's
evaluation interval) of micro-steps.

Per micro-batch: (at an accumulation start: the scheduled lr, the global RNGs reseeded) ->
forward under autocast (the task's ``compute_loss``) -> backward (DDP all-reduce only on the last
micro-step of an accumulation) -> on the boundary: unscale, clip, optimizer step, zero grads.

No host-device synchronisation happens in a step except on logging steps: loss sums and the
non-finite check stay on the device until then.
"""
from __future__ import annotations

import contextlib
import math
import random
import resource
import time
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from engine.data_wait import DataWait, warning as data_wait_warning
from engine.distributed import all_reduce_mean, get_rank, get_world_size, is_main_process
from engine.stop import StopAgreement, StopRequested, agreed_stop_now, stop_signals_held


class NonFiniteLossError(RuntimeError):
    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"non-finite loss ({value}) at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


def resolve_amp(amp: Optional[str], device: torch.device) -> str:
    """Default: bf16 on a GPU that supports it, none elsewhere."""
    if amp is None:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return amp


def autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def make_scaler(amp: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A GradScaler only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def seed_rngs(seed: int, rank: int, epoch: int = 0, step: int = -1) -> None:
    """Reseed the global RNGs (torch, NumPy, random) from (seed, rank, epoch, step).

    Called at start-up and at every optimizer step, so that anything drawing from them
    (drop path, Mixup) draws the same in a run resumed mid-epoch as in an uninterrupted one,
    on every rank, without saving RNG states."""
    s = (seed + 10_007 * rank + 1_000_003 * epoch + 7_919 * (step + 1)) % (2 ** 31)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (each period); the CPU's peak resident set size cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) MiB at their peaks since ``reset_peak_memory``: reserved is what the caching
    allocator holds, what runs out first. CPU: the process's peak resident set size, twice."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, torch.cuda.max_memory_reserved(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux
    return rss, rss


def peak_memory_over_ranks(device: torch.device) -> tuple[float, float]:
    """``peak_memory_mb``, the largest over all ranks (every rank calls this at the same point)."""
    alloc, reserved = peak_memory_mb(device)
    if get_world_size() > 1:
        t = torch.tensor([alloc, reserved], dtype=torch.float64).to(device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        alloc, reserved = t.tolist()
    return alloc, reserved


def _mem_text(device: torch.device) -> str:
    alloc, reserved = peak_memory_mb(device)
    return f"mem {alloc:.0f}MB" + (f" (reserved {reserved:.0f}MB)" if device.type == "cuda" else "")


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StepOutput(NamedTuple):
    """What a task's ``compute_loss(batch)`` returns: the loss to minimise, the images in the batch,
    per-step counts (summed over the period and the ranks, e.g. ``skipped_images``) and per-step
    means (averaged over the period's steps and the ranks, e.g. a detector's loss terms)."""
    loss: Tensor
    size: int
    counts: dict = {}
    means: dict = {}


@dataclass(frozen=True)
class StepSettings:
    """How each micro-step runs."""
    accum: int = 1                  # micro-steps per optimizer step (--accum_iter)
    clip: Optional[float] = None    # gradient-norm clipping (--clip_grad)
    amp: str = "none"               # autocast precision: bf16, fp16 or none
    print_every: int = 20           # a progress line every N micro-steps (--print_freq)
    seed: int = 0                   # the global RNGs restart from (seed, rank, period, step)
    num_workers: Optional[int] = None   # named by the data-wait warning
    max_skipped: Optional[int] = None   # unreadable samples a period may skip (None: the default share, -1: any)
    dist_timeout: float = 0.0           # minutes a collective waits (the wait for rank 0's work is longer)
    data_advice: str = "raise --num_workers"   # the data-wait warning's advice (what the program offers)


def _set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """The scheduled lr into every group, times the group's ``lr_scale`` (layer decay)."""
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)


class StepLoop:
    """Runs the micro-steps of one period at a time for ``model`` (the training model: DDP and
    compiled where they apply), ``optimizer`` and ``scaler`` (None unless fp16)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: Optional[torch.amp.GradScaler], device: torch.device, settings: StepSettings,
                 stop: Optional[Callable[[], bool]] = None, log_writer=None) -> None:
        self.model, self.optimizer, self.scaler, self.device = model, optimizer, scaler, device
        self.settings, self.stop, self.log_writer = settings, stop, log_writer
        core = getattr(model, "_orig_mod", model)  # under --compile, the DDP module inside
        self.ddp = core if isinstance(core, torch.nn.parallel.DistributedDataParallel) else None

    def run(self, batches: Iterable, period: int, first: int, length: int,
            compute_loss: Callable[[object], StepOutput], lr_at: Callable[[int], float], header: str = "",
            periods: Optional[int] = None, name: str = "") -> dict:
        """Micro-steps ``first`` .. ``length - 1`` of ``period`` (``batches`` yields exactly those);
        ``lr_at(step)`` is the schedule's lr at micro-step ``step`` of this period, ``periods`` the
        run's length (for the whole-run ETA), ``name`` the period as warnings name it (default 'epoch N').
        Returns the period's statistics; raises
        NonFiniteLossError (on a logging step or at the end, before anything is saved) and StopRequested.
        """
        s, model, device = self.settings, self.model, self.device
        accum = max(1, s.accum)
        world = get_world_size()
        model.train()
        totals = _Totals(device)
        timer = _Timer(first, length)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        reset_peak_memory(device)  # this period's peak, not the run's (figures and evaluation included)
        # A stop requested during the last steps of the previous period (or during start-up) is honoured
        # here, after that period's normal checkpoint and log line: nothing of it is lost.
        if self.stop is not None and agreed_stop_now(self.stop, device):
            raise StopRequested(period, first)
        agreement = StopAgreement(self.stop, device) if self.stop is not None else None
        with stop_signals_held():  # DataLoader workers start with the stop signals blocked (engine.stop)
            batches = iter(batches)
        waited = DataWait()  # time spent waiting for each batch (engine/data_wait.py)
        count = length - first
        for it, batch in enumerate(waited.wrap(batches)):
            step = first + it
            if step % accum == 0:
                lr = lr_at(step)
                _set_lr(self.optimizer, lr)
                # Global RNGs (drop path, Mixup) restart from (seed, rank, period, step) at every optimizer
                # step, so a run resumed mid-period on any rank draws exactly what the uninterrupted one drew.
                seed_rngs(s.seed, get_rank(), period, step)
            boundary = (step + 1) % accum == 0 or step + 1 == length
            sync = self.ddp.no_sync() if (self.ddp is not None and not boundary) else contextlib.nullcontext()
            with sync:
                with autocast(s.amp, device):
                    out = compute_loss(batch)
                # the last accumulation of a period may be shorter: weight its micro-steps by its true length
                group = accum if (step // accum + 1) * accum <= length else length - (step // accum) * accum
                scaled = out.loss / group
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            if boundary:
                self._update()
            totals.add(step, out, world)
            last = it + 1 == count
            if it % max(1, s.print_every) == 0 or last:
                totals.check_finite(period)
                if is_main_process():
                    self._progress(header, it, step, period, length, periods, lr, out.loss, totals, timer, waited)
            # (not on the last step: the period then ends normally and the next one stops before its first step)
            if agreement is not None and boundary and step + 1 < length and agreement(step, accum, length):
                totals.check_finite(period)
                raise StopRequested(period, step + 1)
        totals.check_finite(period)
        stats = totals.stats(lr, timer.elapsed(), world)
        stats.update(waited.epoch_stats(device))
        if is_main_process():
            note = data_wait_warning(stats, name or f"epoch {period}", s.num_workers, s.data_advice)
            if note:
                print(note, flush=True)
            if self.log_writer is not None:
                self.log_writer.add_scalar("epoch/data_wait_share", stats["data_wait_share"], period)
        if math.isnan(stats["loss"]):
            raise NonFiniteLossError(period, length - 1, stats["loss"])
        return stats

    def _update(self) -> None:
        """The optimizer step at an accumulation boundary: unscale (fp16), clip, step, zero grads."""
        clip, optimizer, scaler = self.settings.clip, self.optimizer, self.scaler
        if scaler is not None:
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _progress(self, header: str, it: int, step: int, period: int, length: int, periods: Optional[int],
                  lr: float, loss: Tensor, totals: "_Totals", timer: "_Timer", waited: DataWait) -> None:
        """Rank 0's progress line (and TensorBoard's step scalars)."""
        now = time.time()
        rate = timer.rate(totals.images, now)
        wait_share = waited.interval_share()
        per_step = timer.per_step(it, now)
        eta = per_step * (length - step - 1)
        # the whole run at this period's step rate (the end-of-period line adds evaluation and checkpoints)
        run_eta = eta + per_step * length * max((periods or period + 1) - period - 1, 0)
        value = loss.detach().double().item()
        print(f"{header} [{step + 1}/{length}] eta {_fmt_eta(eta)} (run {_fmt_eta(run_eta)}) loss {value:.4f} "
              f"(avg {totals.mean_loss():.4f}) lr {lr:.3e} img/s {rate:.1f} data {wait_share:.0%} "
              f"{_mem_text(self.device)}", flush=True)
        if self.log_writer is not None:
            x = int((step / length + period) * 1000)
            self.log_writer.add_scalar("train/loss", value, x)
            self.log_writer.add_scalar("train/lr", lr, x)
            self.log_writer.add_scalar("train/data_wait_share", wait_share, x)


class _Timer:
    """Wall time of a period, and the image rate between progress lines."""

    def __init__(self, first: int, length: int) -> None:
        self.start = self.last = time.time()
        self.last_images = 0
        self.first_done: Optional[float] = None   # when the period's first step ended

    def per_step(self, it: int, now: float) -> float:
        """Seconds per step for the ETAs: after the first step, the time since it ended over the steps
        since (the first one carries worker start-up and warm-up, which made early ETAs swing)."""
        if it == 0 or self.first_done is None:
            self.first_done = now if self.first_done is None else self.first_done
            return now - self.start
        return (now - self.first_done) / it

    def rate(self, images: int, now: float) -> float:
        rate = (images - self.last_images) / max(now - self.last, 1e-9)
        self.last, self.last_images = now, images
        return rate

    def elapsed(self) -> float:
        return time.time() - self.start


class _Totals:
    """The period's running sums, kept on the device: loss, the first non-finite step, counts, means."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.bad_value = torch.zeros((), device=device, dtype=torch.float64)
        self.seen = self.images = 0
        self.counts: dict[str, float] = {}
        self.means: dict[str, float] = {}

    def add(self, step: int, out: StepOutput, world: int) -> None:
        loss_d = out.loss.detach().double()
        finite = torch.isfinite(loss_d)
        newly_bad = (~finite) & (self.first_bad < 0)
        self.first_bad = torch.where(newly_bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_value = torch.where(newly_bad, loss_d, self.bad_value)
        self.loss_sum += torch.where(finite, loss_d, torch.zeros_like(loss_d))
        for k, v in out.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for k, v in out.means.items():
            self.means[k] = self.means.get(k, 0) + v
        self.seen += 1
        self.images += out.size * world

    def mean_loss(self) -> float:
        return self.loss_sum.item() / self.seen

    def check_finite(self, period: int) -> None:
        # Every rank reaches the same logging steps: agree, so that no rank waits for one that stopped.
        bad = self.first_bad.clone()
        if get_world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        step = int(bad.item())
        if step >= 0:
            raise NonFiniteLossError(period, step, float(self.bad_value.item()))

    def stats(self, lr: float, elapsed: float, world: int) -> dict:
        """The period's statistics; counts summed and means averaged over the ranks too."""
        mean_loss = all_reduce_mean((self.loss_sum / max(self.seen, 1)).float()).item()
        peak_alloc, peak_reserved = peak_memory_over_ranks(self.device)
        stats = {"loss": mean_loss, "lr": lr, "images_per_sec": self.images / max(elapsed, 1e-9),
                 "peak_mem_mb": peak_alloc, "peak_reserved_mb": peak_reserved, "epoch_time_s": elapsed}
        counts, means = dict(self.counts), {k: float(v) for k, v in self.means.items()}  # (device sums: one copy)
        if world > 1 and (counts or means):  # summed over ranks, not rank 0's alone
            keys = sorted(counts) + sorted(means)
            sums = torch.tensor([float({**counts, **means}[k]) for k in keys], device=self.device,
                                dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            summed = dict(zip(keys, sums.tolist()))
            counts = {k: int(summed[k]) if float(summed[k]).is_integer() else float(summed[k]) for k in counts}
            means = {k: summed[k] for k in means}
        stats.update(counts)
        stats.update({k: v / (max(self.seen, 1) * world) for k, v in means.items()})
        return stats
