"""The run skeleton every training program shares: start-up, model wrapping, the epoch loop with its
checkpoint cadence and stop handling, and the end of the run record.

A program (main_pretrain.py, main_finetune.py, main_detection.py, main_segmentation.py) keeps only
what is its own: flags, data set, model, optimizer and an ``Epochs`` object with its per-epoch hooks;
``run_epochs`` does the rest, in this order per epoch: ``train`` -> (when the epoch evaluates: the
trained state to ``checkpoint-last.pth``, marked as awaiting its evaluation) -> ``evaluate`` (what to
checkpoint) -> save -> ``log`` (rank 0) -> the progress line -> the limit on skipped samples ->
``--exit_after_epoch``. Saving the trained state before the evaluation means that a crash or a kill
during a long evaluation loses no training: the resume runs that evaluation first, then goes on.

A stop signal or a non-finite loss ends the loop through util.stop.finish_interrupted (a resumable
checkpoint and the exit code), a data error or too many skipped samples with one line and status 1,
any other exception with a ``crashed`` end in the run record (then it propagates), a finished
schedule through ``complete``. The output folder is locked for the life of the run
(util/output_lock.py).
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import output_lock
from .cli import UsageError, error_line
from .datasets import SKIP_LIST_NAME, SKIP_LOG_ENV, DataError, check_skipped
from .distributed import (cleanup, default_num_workers, get_rank, get_world_size, init_distributed, is_dist,
                          is_main_process, wait_for_main_process)
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
    lock: Optional[output_lock.FolderLock] = None

    def open_log_writer(self) -> None:
        """TensorBoard on rank 0 when --log_dir is given; a failing disk turns it off, not the run."""
        if is_main_process() and self.args.log_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.log_writer = TensorBoard(SummaryWriter(log_dir=self.args.log_dir), self.args.log_dir)

    def close_log_writer(self) -> None:
        if self.log_writer is not None:
            self.log_writer.close()

    def release(self) -> None:
        """Give up the output folder's lock (the run wrote its last file)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def finish(self, what: str, status: str, start_epoch: int, last_epoch: int, parts: list[str],
               **fields) -> None:
        """The one-line summary and the run record's end (rank 0): ``parts`` follow the epochs run."""
        if not is_main_process():
            return
        args = self.args
        ran = max(0, last_epoch + 1 - start_epoch)
        epochs = (f"epochs {start_epoch}-{last_epoch} of {args.epochs} ({ran} in this run)" if ran else
                  f"no epoch to run ({args.epochs} done)" if start_epoch >= args.epochs else
                  f"no epoch completed in this run (it began at epoch {start_epoch} of {args.epochs})")
        print(summary_line(what, status, time.time() - self.start_time, [epochs, *parts], args.output_dir),
              flush=True)
        self.record.finish(status, epochs_run=ran, last_epoch=last_epoch, **fields)


def gpu_numerics(device: torch.device) -> None:
    """fp32 matmuls and convolutions in TF32 on a GPU: every program and tools/benchmark.py use this.

    SDPA keeps PyTorch's backend order (on an H100 with cuDNN >= 9.9 cuDNN attention comes first);
    scripts/gpu_check.sh compares its outputs and mask gradients with the memory-efficient and math
    kernels at the models' window shapes."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class TensorBoard:
    """A SummaryWriter whose failures cannot end the run: the first OSError (a full or vanished
    --log_dir, raised by its writer thread at the next call) is named once, and TensorBoard stays
    off for the rest of the run. Every other attribute is the writer's."""

    def __init__(self, writer, log_dir: str) -> None:
        self._writer, self._log_dir = writer, log_dir
        self.failed: Optional[BaseException] = None

    def __getattr__(self, name: str):
        attr = getattr(self._writer, name)
        if not callable(attr):
            return attr

        def guarded(*args, **kwargs):
            if self.failed is not None:
                return None
            try:
                return attr(*args, **kwargs)
            except OSError as e:
                self.failed = e
                print(f"warning: TensorBoard cannot write to {self._log_dir} ({type(e).__name__}: {e}); "
                      f"training goes on without it", file=sys.stderr, flush=True)
                try:
                    self._writer.close()
                except OSError:
                    pass
                return None
        return guarded


def lock_output_dir(args, program: str) -> Optional[output_lock.FolderLock]:
    """Rank 0 locks --output_dir (util/output_lock.py); every rank fails alike when it is taken."""
    lock, refusal = None, ""
    if is_main_process():
        try:
            lock = output_lock.acquire(args.output_dir, program, log=lambda m: print(m, flush=True))
        except UsageError as e:
            refusal = str(e)
    if is_dist():
        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise UsageError(refusal)
    return lock


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
    gpu_numerics(device)
    if args.num_workers is None:
        args.num_workers = default_num_workers(device)
    lock = lock_output_dir(args, program)  # before anything is written into the folder
    return Run(args, device, rank, world, stop, RunRecord.start(args, program, device), lock=lock)


def effective_lr(args, world_size: int) -> float:
    """lr = blr * batch_size * accum_iter * world_size / 256 unless --lr is given."""
    if args.lr is not None:
        return args.lr
    return args.blr * args.batch_size * args.accum_iter * world_size / 256


def wrap_for_training(model: nn.Module, args, device: torch.device) -> nn.Module:
    """DDP across the group (when distributed), then torch.compile (with --compile).

    Gradients are views into DDP's all-reduce buckets (``gradient_as_bucket_view``): no second copy
    of every gradient. Every parameter gets a gradient in every step of every model (tests), so
    ``find_unused_parameters`` stays off."""
    train_model = model
    if args.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
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

    def evaluates(self, epoch: int, last: bool) -> bool:
        """Whether ``evaluate`` runs an evaluation after this epoch (then the trained state is saved
        before it): programs that override ``evaluate`` evaluate after the last epoch and every
        --eval_freq epochs (every epoch without that flag)."""
        if type(self).evaluate is Epochs.evaluate:
            return False
        return last or (epoch + 1) % max(1, int(getattr(self.args, "eval_freq", 1) or 1)) == 0

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
        for key in ("loss", "images_per_sec", "peak_mem_mb", "peak_reserved_mb"):
            if key in stats:
                run.log_writer.add_scalar(f"epoch/{key}", stats[key], epoch)
        run.log_writer.flush()


def train_record(epoch: int, stats: dict) -> dict:
    """The log.txt line of an epoch's training alone."""
    return {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}


def run_epochs(run: Run, epochs: Epochs, model: nn.Module, optimizer, scaler, sampler, start_epoch: int,
               start_step: int) -> int:
    """The epoch loop from ``start_epoch`` (``start_step`` micro-steps into it) to --epochs; the exit code.

    A resume whose checkpoint awaits its evaluation (``args.pending_evaluation``, set by
    util.train_state.resume_training_state) runs that evaluation first."""
    args = run.args
    clock = RunClock(start_epoch, args.epochs)
    skip_list = Path(args.output_dir) / SKIP_LIST_NAME
    previous_list = os.environ.get(SKIP_LOG_ENV)
    os.environ[SKIP_LOG_ENV] = str(skip_list.resolve())  # where every data path lists what it skipped
    done = start_epoch - 1  # the last epoch whose training is on disk

    def end_epoch(epoch: int, stats: dict, trained_saved: bool) -> Optional[int]:
        """Evaluate and checkpoint a trained epoch, then log; an exit code when the run ends here."""
        nonlocal done
        last = epoch + 1 == args.epochs
        numbered = last or (args.save_freq > 0 and (epoch + 1) % args.save_freq == 0)
        if not trained_saved and epochs.evaluates(epoch, last):
            # the trained state first: a crash or a kill during the evaluation loses no training
            save_training_state(args, epoch, model, optimizer, scaler, log_record=train_record(epoch, stats),
                                append_log=False, extra=epochs.checkpoint_extra(), evaluation_pending=stats)
            done = epoch
        save = epochs.evaluate(epoch, stats, last)
        save_training_state(args, epoch, model, optimizer, scaler, numbered=numbered, log_record=save.log_record,
                            extra={**epochs.checkpoint_extra(), **(save.extra or {})},
                            extra_names=save.extra_names)
        done = epoch
        if is_main_process():
            epochs.log(epoch, stats, last)
            log_epoch_stats(run, epoch, stats)
            print(clock.line(epoch), flush=True)
        wait_for_main_process(getattr(args, "dist_timeout", 0))  # rank 0 scored, saved and logged alone
        check_skipped(stats, epoch, getattr(args, "max_skipped", None), skip_list)
        if epoch == args.exit_after_epoch and not last:
            if is_main_process():
                print(f"--exit_after_epoch {epoch}: checkpoint written; exiting", flush=True)
            epochs.finish("exited after epoch", epoch)
            cleanup()
            return 0
        return None

    try:
        pending = getattr(args, "pending_evaluation", None)
        if pending is not None:
            del args.pending_evaluation
            if is_main_process():
                print(f"epoch {pending['epoch']}: its training is on disk, its evaluation was interrupted; "
                      f"evaluating it now", flush=True)
            code = end_epoch(pending["epoch"], pending["stats"], trained_saved=True)
            if code is not None:
                return code
        for epoch in range(start_epoch, args.epochs):
            step0 = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch)
            sampler.skip = step0 * args.batch_size
            stats = epochs.train(epoch, step0)
            code = end_epoch(epoch, stats, trained_saved=False)
            if code is not None:
                return code
        epochs.complete()
        cleanup()
        return 0
    except (StopRequested, NonFiniteLossError) as e:
        code = finish_interrupted(e, args, model, optimizer, scaler, run.stop, extra=epochs.checkpoint_extra())
        epochs.finish("stopped" if isinstance(e, StopRequested) else "failed", e.epoch - 1, reason=str(e))
        return code
    except DataError as e:  # bad data (too many skipped samples, a shard unlike its index): one line
        message = error_line(e)
        if is_main_process():
            print(f"error: {message}; stopping. Last good checkpoint: {_last_good(args.output_dir)}",
                  file=sys.stderr, flush=True)
        epochs.finish("failed", done, reason=message)
        cleanup()
        return 1
    except Exception as e:
        _record_crash(epochs, run, done, e)
        raise
    finally:
        if previous_list is None:
            os.environ.pop(SKIP_LOG_ENV, None)
        else:
            os.environ[SKIP_LOG_ENV] = previous_list
        run.release()


def _last_good(output_dir: str) -> str:
    from .checkpoint import list_checkpoints
    found = list_checkpoints(output_dir)
    return str(found[0]) if found else "none"


def _record_crash(epochs: Epochs, run: Run, done: int, e: BaseException) -> None:
    """A run that ends in an unexpected exception still gets its end in the run record (rank 0)."""
    error = f"{type(e).__name__}: {error_line(e)}"[:2000]
    try:
        epochs.finish("crashed", done, error=error)
    except Exception:  # the program's summary needs state the crash left unset: the record alone
        run.record.finish("crashed", last_epoch=done, error=error)
