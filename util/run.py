"""The run skeleton every training program shares: start-up, model wrapping, the epoch loop with its
checkpoint cadence and stop handling, and the end of the run record.

A program (main_pretrain.py, main_finetune.py, main_detection.py, main_segmentation.py) keeps only
what is its own: flags, data set, model, optimizer and an ``Epochs`` object with its per-epoch hooks; ``run_epochs`` does the rest, in
this order per epoch: ``train`` -> ``evaluate`` (what to checkpoint) -> save -> ``log`` (rank 0) ->
the progress line -> ``--exit_after_epoch``. A stop signal or a non-finite loss ends the loop through
util.stop.finish_interrupted (a resumable checkpoint and the exit code), a finished
schedule through ``complete``.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .cli import UsageError
from .distributed import (cleanup, default_num_workers, get_rank, get_world_size, init_distributed, is_main_process,
                          wait_for_main_process)
from .loop import NonFiniteLossError, resolve_amp, seed_rngs
from .run_record import RunClock, RunRecord, summary_line
from .stop import StopRequested, finish_interrupted, setup_stop_signals
from .train_state import save_training_state


@dataclass
class Run:
    """What start-up resolved: the device, this process's place in the group, the stop flag, the
    run record and the wall-clock start."""
    args: object
    device: torch.device
    rank: int
    world: int
    stop: object
    record: RunRecord
    start_time: float = field(default_factory=time.time)
    log_writer: Optional[object] = None

    def open_log_writer(self) -> None:
        """TensorBoard on rank 0 when --log_dir is given."""
        if is_main_process() and self.args.log_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.log_writer = SummaryWriter(log_dir=self.args.log_dir)

    def close_log_writer(self) -> None:
        if self.log_writer is not None:
            self.log_writer.close()

    def finish(self, what: str, status: str, start_epoch: int, last_epoch: int, parts: list[str],
               **fields) -> None:
        """The one-line summary and the run record's end (rank 0): ``parts`` follow the epochs run."""
        if not is_main_process():
            return
        args = self.args
        ran = max(0, last_epoch + 1 - start_epoch)
        epochs = (f"epochs {start_epoch}-{last_epoch} of {args.epochs} ({ran} in this run)" if ran else
                  f"no epoch to run ({args.epochs} done)")
        print(summary_line(what, status, time.time() - self.start_time, [epochs, *parts], args.output_dir),
              flush=True)
        self.record.finish(status, epochs_run=ran, last_epoch=last_epoch, **fields)


def start_run(args, program: str) -> Run:
    """Stop handlers first (a stop during start-up counts), then the process group, device,
    precision, seeds, loader workers and the run record. On a GPU every program runs fp32 matmuls
    and convolutions in TF32 (the same numerics for pretraining, finetuning and dense prediction)."""
    stop = setup_stop_signals()
    init_distributed(args)
    device = torch.device(args.device)
    rank, world = get_rank(), get_world_size()
    args.amp = resolve_amp(args.amp, device)
    seed_rngs(args.seed, rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.num_workers is None:
        args.num_workers = default_num_workers(device)
    return Run(args, device, rank, world, stop, RunRecord.start(args, program, device))


def effective_lr(args, world_size: int) -> float:
    """lr = blr * batch_size * accum_iter * world_size / 256 unless --lr is given."""
    if args.lr is not None:
        return args.lr
    return args.blr * args.batch_size * args.accum_iter * world_size / 256


def wrap_for_training(model: nn.Module, args, device: torch.device) -> nn.Module:
    """DDP across the group (when distributed), then torch.compile (with --compile)."""
    train_model = model
    if args.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    return train_model


@dataclass
class EpochSave:
    """What one epoch's checkpoint holds beyond the training state."""
    log_record: dict                          # the line of log.txt
    extra: Optional[dict] = None              # this epoch's checkpoint fields beyond checkpoint_extra()
    extra_names: tuple[str, ...] = ()         # extra copies (e.g. checkpoint-best.pth)


class Epochs:
    """A program's per-epoch hooks; ``run_epochs`` calls them in the order of the module docstring.

    A program that keeps a best score names its checkpoint field in ``best_key``, updates
    ``self.best`` and says in ``best_text`` how to print it: a stopped run's checkpoint then carries
    it, and the end of the run reports it."""

    best_key: str = ""            # e.g. "best_acc1"; empty: no best score

    def __init__(self, run: Run, start_epoch: int, best: float = 0.0) -> None:
        self.run, self.args, self.start_epoch, self.best = run, run.args, start_epoch, best

    def train(self, epoch: int, start_step: int) -> dict:
        raise NotImplementedError

    def evaluate(self, epoch: int, stats: dict, last: bool) -> EpochSave:
        return EpochSave({"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}})

    def log(self, epoch: int, stats: dict, last: bool) -> None:
        """Rank 0, after the checkpoint: the program's own TensorBoard scalars, figures."""

    def best_text(self) -> str:
        """The best score as the end-of-training line prints it, e.g. 'best top-1 67.30%'."""
        return ""

    def checkpoint_extra(self) -> dict:
        """Fields every checkpoint of this run carries, a stopped run's included: the best score."""
        return {self.best_key: self.best} if self.best_key else {}

    def finish(self, status: str, last_epoch: int, **extra) -> None:
        """The summary line and the run record's end."""

    def complete(self) -> None:
        """The schedule ran to its end (every rank): the training time, then ``finish``."""
        if is_main_process():
            best = self.best_text()
            print(f"training time {datetime.timedelta(seconds=int(time.time() - self.run.start_time))}"
                  + (f"; {best}" if best else ""), flush=True)
            self.run.close_log_writer()
        self.finish("completed", self.args.epochs - 1)


def require_a_batch(steps: int, num_images: int, args, world: int) -> None:
    """A training set smaller than one global batch gives epochs of no step: say so before any work."""
    if steps == 0:
        raise UsageError(f"{num_images} training images are fewer than one global batch "
                         f"({args.batch_size} x {world} processes): lower --batch_size")


def log_epoch_stats(run: Run, epoch: int, stats: dict) -> None:
    """Rank 0: what every program reports per epoch (loss, speed, memory, unreadable images)."""
    if stats.get("skipped_images"):
        print(f"warning: {stats['skipped_images']} unreadable images skipped in epoch {epoch} (all ranks)",
              flush=True)
    if run.log_writer is not None:
        for key in ("loss", "images_per_sec", "peak_mem_mb"):
            if key in stats:
                run.log_writer.add_scalar(f"epoch/{key}", stats[key], epoch)
        run.log_writer.flush()


def run_epochs(run: Run, epochs: Epochs, model: nn.Module, optimizer, scaler, sampler, start_epoch: int,
               start_step: int) -> int:
    """The epoch loop from ``start_epoch`` (``start_step`` micro-steps into it) to --epochs; the exit code."""
    args = run.args
    clock = RunClock(start_epoch, args.epochs)
    try:
        for epoch in range(start_epoch, args.epochs):
            step0 = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch)
            sampler.skip = step0 * args.batch_size
            stats = epochs.train(epoch, step0)
            last = epoch + 1 == args.epochs
            save = epochs.evaluate(epoch, stats, last)
            numbered = last or (args.save_freq > 0 and (epoch + 1) % args.save_freq == 0)
            save_training_state(args, epoch, model, optimizer, scaler, numbered=numbered, log_record=save.log_record,
                                extra={**epochs.checkpoint_extra(), **(save.extra or {})},
                                extra_names=save.extra_names)
            if is_main_process():
                epochs.log(epoch, stats, last)
                log_epoch_stats(run, epoch, stats)
                print(clock.line(epoch), flush=True)
            wait_for_main_process(getattr(args, "dist_timeout", 0))  # rank 0 scored, saved and logged alone
            if epoch == args.exit_after_epoch and not last:
                if is_main_process():
                    print(f"--exit_after_epoch {epoch}: checkpoint written; exiting", flush=True)
                epochs.finish("exited after epoch", epoch)
                cleanup()
                return 0
    except (StopRequested, NonFiniteLossError) as e:
        code = finish_interrupted(e, args, model, optimizer, scaler, run.stop, extra=epochs.checkpoint_extra())
        epochs.finish("stopped" if isinstance(e, StopRequested) else "failed", e.epoch - 1, reason=str(e))
        return code
    epochs.complete()
    cleanup()
    return 0
