"""The training step shared by pretraining and finetuning.

One epoch = for each micro-batch: (lr update at accumulation boundaries) ->
forward under autocast -> backward (DDP all-reduce only on the last micro-step of
an accumulation) -> on the boundary: unscale, clip, optimizer step, zero grads.

No host-device synchronisation happens in a step except on logging steps: loss
sums and the non-finite check stay on the device until then.
"""
from __future__ import annotations

import contextlib
import math
import random
import resource
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .data_wait import DataWait, warning as data_wait_warning
from .distributed import all_reduce_mean, get_rank, get_world_size, is_main_process
from .lr_sched import adjust_learning_rate
from .stop import StopAgreement, StopRequested, agreed_stop_now, stop_signals_held


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


def fused_optimizer_ok(device: torch.device) -> bool:
    """The fused (single-kernel) AdamW runs on CPU and CUDA; on a 2-core CPU it takes Swin-T's
    optimizer step from ~140 ms (per-parameter loop) to ~11 ms."""
    return device.type in ("cpu", "cuda")


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
    """Start a new peak (each epoch); the CPU's peak resident set size cannot be reset."""
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


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scaler: Optional[torch.amp.GradScaler], device: torch.device, epoch: int, args,
                    compute_loss: Callable[[object], tuple[Tensor, int, dict[str, float]]], log_writer=None,
                    header: str = "", stop_flag: Optional[Callable[[], bool]] = None,
                    start_step: int = 0) -> dict:
    """Train one epoch; ``compute_loss(batch) -> (loss, batch_size, extras)`` runs under autocast
    (``extras``: per-step counts summed over the epoch, e.g. ``skipped_images``).

    Returns averaged statistics; raises NonFiniteLossError (on a logging step or at
    the end of the epoch, before anything is saved) and StopRequested.
    """
    model.train()
    accum = max(1, args.accum_iter)
    steps = start_step + len(loader)  # a full epoch, also when resuming mid-epoch
    amp = args.amp
    core = getattr(model, "_orig_mod", model)  # under --compile, the DDP module inside
    is_ddp = isinstance(core, torch.nn.parallel.DistributedDataParallel)
    world = get_world_size()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    bad_value = torch.zeros((), device=device, dtype=torch.float64)
    seen = images = 0
    extra_sums: dict[str, float] = {}
    start = last_log = time.time()
    last_images = 0
    lr = optimizer.param_groups[0]["lr"]
    print_freq = max(1, args.print_freq)
    optimizer.zero_grad(set_to_none=True)
    reset_peak_memory(device)  # this epoch's peak, not the run's (figures and evaluation included)

    def check_finite() -> None:
        # Every rank reaches the same logging steps: agree, so that no rank waits for one that stopped.
        bad = first_bad.clone()
        if world > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        step = int(bad.item())
        if step >= 0:
            raise NonFiniteLossError(epoch, step, float(bad_value.item()))

    # A stop requested during the last steps of the previous epoch (or during start-up) is honoured
    # here, after that epoch's normal checkpoint and log line: nothing of it is lost.
    if stop_flag is not None and agreed_stop_now(stop_flag, device):
        raise StopRequested(epoch, start_step)
    agreement = StopAgreement(stop_flag, device) if stop_flag is not None else None
    with stop_signals_held():  # DataLoader workers start with the stop signals blocked (util.stop)
        batches = iter(loader)
    waited = DataWait()  # time spent waiting for each batch (util/data_wait.py)
    batches = waited.wrap(batches)
    for it, batch in enumerate(batches):
        step = start_step + it
        if step % accum == 0:
            lr = adjust_learning_rate(optimizer, step / steps + epoch, args)
            # Global RNGs (drop path, Mixup) restart from (seed, rank, epoch, step) at every optimizer
            # step, so a run resumed mid-epoch on any rank draws exactly what the uninterrupted one drew.
            seed_rngs(args.seed, get_rank(), epoch, step)
        boundary = (step + 1) % accum == 0 or step + 1 == steps
        sync_ctx = core.no_sync() if (is_ddp and not boundary) else contextlib.nullcontext()
        with sync_ctx:
            with autocast(amp, device):
                loss, batch_size, extras = compute_loss(batch)
            # the last accumulation of an epoch may be shorter: weight its micro-steps by its true length
            group = accum if (step // accum + 1) * accum <= steps else steps - (step // accum) * accum
            scaled = loss / group
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if boundary:
            if scaler is not None:
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                if args.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_d = loss.detach().double()
        finite = torch.isfinite(loss_d)
        newly_bad = (~finite) & (first_bad < 0)
        first_bad = torch.where(newly_bad, torch.full_like(first_bad, step), first_bad)
        bad_value = torch.where(newly_bad, loss_d, bad_value)
        loss_sum += torch.where(finite, loss_d, torch.zeros_like(loss_d))
        for k, v in extras.items():
            extra_sums[k] = extra_sums.get(k, 0) + v
        seen += 1
        images += batch_size * world

        last = it + 1 == len(loader)
        if it % print_freq == 0 or last:
            check_finite()
            if is_main_process():
                now = time.time()
                rate = (images - last_images) / max(now - last_log, 1e-9)
                last_log, last_images = now, images
                avg = loss_sum.item() / seen
                wait_share = waited.interval_share()
                per_step = (now - start) / (it + 1)
                eta = per_step * (steps - it - 1)
                # the whole run at this epoch's step rate (the end-of-epoch line adds evaluation and checkpoints)
                run_eta = eta + per_step * steps * max(getattr(args, "epochs", epoch + 1) - epoch - 1, 0)
                print(f"{header} [{it + 1}/{steps}] eta {_fmt_eta(eta)} (run {_fmt_eta(run_eta)}) loss {loss_d.item():.4f} "
                      f"(avg {avg:.4f}) lr {lr:.3e} img/s {rate:.1f} data {wait_share:.0%} "
                      f"{_mem_text(device)}", flush=True)
                if log_writer is not None:
                    x = int((step / steps + epoch) * 1000)
                    log_writer.add_scalar("train/loss", loss_d.item(), x)
                    log_writer.add_scalar("train/lr", lr, x)
                    log_writer.add_scalar("train/data_wait_share", wait_share, x)
        # (not on the last step: the epoch then ends normally and the next one stops before its first step)
        if stop_flag is not None and boundary and step + 1 < steps and agreement(step, accum, steps):
            check_finite()
            raise StopRequested(epoch, step + 1)

    check_finite()
    elapsed = time.time() - start
    mean_loss = all_reduce_mean((loss_sum / max(seen, 1)).float()).item()
    peak_alloc, peak_reserved = peak_memory_over_ranks(device)
    stats = {"loss": mean_loss, "lr": lr, "images_per_sec": images / max(elapsed, 1e-9),
             "peak_mem_mb": peak_alloc, "peak_reserved_mb": peak_reserved, "epoch_time_s": elapsed}
    if world > 1 and extra_sums:  # counts such as skipped images: summed over ranks, not rank 0's alone
        sums = torch.tensor([float(extra_sums[k]) for k in sorted(extra_sums)], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(sums)
        extra_sums = {k: int(v) if float(v).is_integer() else float(v) for k, v in zip(sorted(extra_sums), sums.tolist())}
    stats.update(extra_sums)
    stats.update(waited.epoch_stats(device))
    if is_main_process():
        note = data_wait_warning(stats, epoch, getattr(args, "num_workers", None))
        if note:
            print(note, flush=True)
        if log_writer is not None:
            log_writer.add_scalar("epoch/data_wait_share", stats["data_wait_share"], epoch)
    if math.isnan(mean_loss):
        raise NonFiniteLossError(epoch, steps - 1, mean_loss)
    return stats
