"""The training loop every program shares: a Trainer that counts micro-steps.

A run is ``Periods.total`` micro-steps laid out in periods of ``Periods.length``: an epoch for the
image programs, an evaluation interval for segmentation, which counts iterations. The period is a
view of the step: it is what the sampler calls an epoch, where a checkpoint says the run stands
(period, micro-step in it), and what progress lines count. What happens when is a cadence of the
step: a progress line every --print_freq micro-steps (engine.step), an evaluation and a numbered
checkpoint when their ``Cadence`` falls due at a period's end; every period ends with
checkpoint-last.pth and its log.txt line.

The read path of one batch: main_*.py -> ``Trainer.fit`` -> ``StepLoop.run`` (engine.step) ->
``task.compute_loss`` -> the model; every call goes down. A program's own part is its ``Task``
(engine_pretrain.py, engine_finetune.py, engine_detection.py, engine_segmentation.py).

At a period's end, in this order: (when an evaluation falls due: the trained state to
checkpoint-last.pth, marked as awaiting its evaluation) -> ``task.evaluate`` -> checkpoint
(checkpoint-{period}.pth when due, checkpoint-best.pth when the score improved, checkpoint-last.pth,
the log.txt line) -> ``task.log`` (rank 0) -> the progress line -> the other ranks wait for rank 0
-> the limit on skipped samples -> --exit_after_epoch. Saving the trained state before the
evaluation means that a crash or a kill during a long evaluation loses no training: the resume runs
that evaluation first, then goes on.

With a ``Recovery`` (--on_nonfinite rollback) a non-finite loss first rolls the period back to the
state it began with (kept in memory) and trains it again without the offending micro-steps (with
--rollback_lr_scale, at a lowered lr for a window of steps), a bounded number of times. A stop signal or a non-finite loss ends the loop through
engine.stop.finish_interrupted (a resumable checkpoint and the exit code), a data error or too many skipped samples with one line and status 1,
any other exception with a ``crashed`` end in the run record (then it propagates), a finished
schedule through ``task.complete``. The output folder's lock is given back when the loop ends.
"""
from __future__ import annotations

import datetime
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine.checkpoint import list_checkpoints
from engine.distributed import cleanup, is_main_process, wait_for_main_process
from engine.loaders import TrainLoader
from engine.record import RunClock
from engine.run import Run
from engine.schedule import Schedule
from engine.state import TrainState, weights_digest
from engine.step import NonFiniteLossError, StepLoop, StepOutput, StepSettings
from engine.stop import StopRequested, epoch_position, finish_interrupted
from errors import DataError, UsageError, error_line
from imagedata.datasets import SKIP_LIST_NAME, SKIP_LOG_ENV, check_skipped

BEST_NAME = "checkpoint-best.pth"


@dataclass
class Evaluation:
    """What a task's evaluation found."""
    metrics: dict                                   # the run record keeps it (final_val, metrics)
    score: Optional[float] = None                   # what "best" is about (higher is better); None: no score
    record: dict = field(default_factory=dict)      # this evaluation's fields of the log.txt line
    checkpoint: dict = field(default_factory=dict)  # this evaluation's fields of the checkpoint
    best: Optional[float] = None                    # the best score so far, this one included (the Trainer's)


class Task:
    """A program's part of the loop: its loss, its evaluation and what it reports.

    ``what`` names the run in its summary line; ``best_key`` is the checkpoint field of the best
    score (empty: the task keeps none)."""
    what: str = ""
    best_key: str = ""

    def begin(self, period: int, step: int) -> None:
        """Before micro-step ``step`` of ``period`` (pretraining replays its mask draws here)."""

    def compute_loss(self, batch) -> StepOutput:
        """One micro-batch under autocast: the loss, the images and per-step counts and means."""
        raise NotImplementedError

    def evaluate(self, period: Optional[int]) -> Optional[Evaluation]:
        """Evaluate the model (every rank calls it; ``period`` None: an evaluate-only run)."""
        return None

    @property
    def evaluates(self) -> bool:
        """Whether the task has an evaluation (then the trained state is saved before it runs)."""
        return type(self).evaluate is not Task.evaluate

    def period_stats(self, period: int, stats: dict) -> dict:
        """More fields of a period's training statistics (log.txt's train_*, the summary): pretraining's
        cost report."""
        return {}

    def log(self, period: int, stats: dict, evaluation: Optional[Evaluation]) -> None:
        """Rank 0, after the period's checkpoint: prints, JSON files, TensorBoard, figures."""

    def best_text(self, best: float) -> str:
        """The best score as the end-of-training line prints it, e.g. 'best top-1 67.30%'."""
        return ""

    def finish(self, stats: dict, evaluation: Optional[Evaluation], best: float,
               best_period: Optional[int]) -> tuple[list[str], dict]:
        """The summary line's parts after the epochs, and the run record's end fields."""
        return [], {}

    def complete(self, last_period: int, trained: bool) -> dict:
        """A schedule that ran to its end (every rank; ``trained``: this process ran a period of it);
        returns more fields for the run record (pretraining's final figure)."""
        return {}

    def report(self, evaluation: Evaluation) -> tuple[str, list[str]]:
        """Rank 0 after an evaluate-only run: print and write the result; the summary's subject and parts."""
        raise NotImplementedError


@dataclass(frozen=True)
class Periods:
    """The run in micro-steps: ``total`` of them in periods of ``length`` (the last may be shorter).
    ``unit`` says how progress lines name a period: "epoch" (Epoch [e]) or "iteration" (Iter [a-b])."""
    length: int
    total: int
    unit: str = "epoch"

    @property
    def count(self) -> int:
        return math.ceil(self.total / self.length)

    def size(self, period: int) -> int:
        return max(min(self.length, self.total - period * self.length), 0)

    def end(self, period: int) -> int:
        """Micro-steps done at the end of ``period``."""
        return period * self.length + self.size(period)

    def name(self, period: int) -> str:
        """The period as messages name it: 'epoch 3', or 'iterations 16000-32000'."""
        if self.unit == "epoch":
            return f"epoch {period}"
        return f"iterations {period * self.length}-{self.end(period)}"

    def position(self, period: int, step: int) -> str:
        """Where the run stands before micro-step ``step`` of ``period``: 'epoch 3, step 10' ('the end of
        epoch 2' at step 0), or 'iteration 9 of 12'."""
        if self.unit == "epoch":
            return epoch_position(period, step)
        return f"iteration {period * self.length + step} of {self.total}"

    def header(self, period: int) -> str:
        if self.unit == "epoch":
            return f"Epoch [{period}]"
        first = period * self.length
        return f"Iter [{first}-{first + self.size(period)}]"


@dataclass(frozen=True)
class Cadence:
    """Falls due every ``every`` micro-steps and at the end of the run (``every`` 0: only at the end)."""
    every: int = 0

    def due(self, step: int, total: int) -> bool:
        return step == total or (self.every > 0 and step % self.every == 0)


@dataclass
class Recovery:
    """--on_nonfinite rollback: at most ``max_rollbacks`` in a run. A rollback restores the model,
    optimizer and scaler to the start of the period (a CPU copy taken then), and the period is trained
    again without the accumulation group of the first non-finite loss and the one before it (whose
    update may have made it); the masks and the data order of every other micro-step stay the same."""
    max_rollbacks: int = 3
    lr_scale: float = 1.0        # --rollback_lr_scale: the lr factor in the window after a rollback
    lr_window: int = 0           # --rollback_lr_window: its length in optimizer steps (0: no window)
    # per rollback: {"epoch", "step", "error", "skipped": [lo, hi]} (+ "lr_window": TrainState.lr_window)
    done: list = field(default_factory=list)

    def open_window(self, state: TrainState, start: int, accum: int) -> Optional[dict]:
        """Lower the lr for ``lr_window`` optimizer steps from global micro-step ``start`` (the point
        rolled back to; skipped micro-steps count); the window is kept in ``state``, so checkpoints
        carry it and a resumed run trains with the same lr. None when no window is asked for."""
        if self.lr_window <= 0 or self.lr_scale == 1.0:
            return None
        state.lr_window = {"start": start, "end": start + self.lr_window * accum, "scale": self.lr_scale}
        return state.lr_window

    @staticmethod
    def snapshot(state: TrainState) -> dict:
        def cpu(obj):
            if isinstance(obj, dict):
                return {k: cpu(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(cpu(v) for v in obj)
            return obj.detach().to("cpu", copy=True) if hasattr(obj, "detach") else obj
        return {"model": cpu(state.model.state_dict()), "optimizer": cpu(state.optimizer.state_dict()),
                "scaler": cpu(state.scaler.state_dict()) if state.scaler is not None else None}

    @staticmethod
    def restore(state: TrainState, snap: dict) -> None:
        state.model.load_state_dict(snap["model"])
        state.optimizer.load_state_dict(snap["optimizer"])
        if state.scaler is not None:
            state.scaler.load_state_dict(snap["scaler"])


class _Take:
    """The first ``n`` batches of a loader, iterated lazily (the step loop starts workers itself)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)


def require_a_batch(steps: int, num_images: int, batch_size: int, world: int) -> None:
    """A training set smaller than one global batch gives periods of no step: say so before any work."""
    if steps == 0:
        raise UsageError(f"{num_images} training images are fewer than one global batch "
                         f"({batch_size} x {world} processes): lower --batch_size")


class Trainer:
    """Trains ``state`` on ``loader`` with ``task`` until ``periods`` are done (``fit``)."""

    def __init__(self, run: Run, state: TrainState, task: Task, loader: TrainLoader, schedule: Schedule,
                 periods: Periods, settings: StepSettings, evaluate: Cadence = Cadence(1),
                 save: Cadence = Cadence(0), exit_after: int = -1, recovery: Optional[Recovery] = None) -> None:
        self.run, self.state, self.task, self.loader, self.schedule = run, state, task, loader, schedule
        self.recovery = recovery
        self.periods, self.settings = periods, settings
        self.eval_cadence, self.save_cadence, self.exit_after = evaluate, save, exit_after
        self.stats: dict = {}
        self.evaluation: Optional[Evaluation] = None
        self.first_period = state.epoch

    def fit(self) -> int:
        """Train from where ``state`` stands to the end; returns the exit code."""
        run, state, periods = self.run, self.state, self.periods
        run.open_log_writer()
        steps = StepLoop(state.train_model, state.optimizer, state.scaler, run.device, self.settings, run.stop,
                         run.log_writer)
        clock = RunClock(state.epoch, periods.count)
        skip_list = Path(run.output_dir) / SKIP_LIST_NAME
        previous_list = os.environ.get(SKIP_LOG_ENV)
        os.environ[SKIP_LOG_ENV] = str(skip_list.resolve())  # where every data path lists what it skipped
        self.done = state.epoch - 1  # the last period whose training is on disk
        try:
            pending, state.pending_evaluation = state.pending_evaluation, None
            if pending is not None:
                run.log(f"epoch {pending['epoch']}: its training is on disk, its evaluation was interrupted; "
                        f"evaluating it now")
                self.stats = pending["stats"]
                if self._end_period(pending["epoch"], clock, skip_list, trained_saved=True):
                    return 0
            for period in range(state.epoch, periods.count):
                first = state.step if period == state.epoch else 0
                self.stats = self._train(steps, period, first)
                if self._end_period(period, clock, skip_list):
                    return 0
            self._complete()
            cleanup()
            return 0
        except (StopRequested, NonFiniteLossError) as e:
            code = finish_interrupted(e, state.flags, state.model, state.optimizer, state.scaler, run.stop,
                                      extra=state.fields(), position=periods.position)
            self._finish("stopped" if isinstance(e, StopRequested) else "failed", e.epoch - 1, reason=str(e))
            return code
        except DataError as e:  # bad data (too many skipped samples, a shard unlike its index): one line
            message = error_line(e)
            if is_main_process():
                found = list_checkpoints(run.output_dir)
                print(f"error: {message}; stopping. Last good checkpoint: {found[0] if found else 'none'}",
                      file=sys.stderr, flush=True)
            self._finish("failed", self.done, reason=message)
            cleanup()
            return 1
        except Exception as e:  # the run record still gets its end (rank 0), then the error propagates
            error = f"{type(e).__name__}: {error_line(e)}"[:2000]
            try:
                self._finish("crashed", self.done, error=error)
            except Exception:  # the task's summary needs state the crash left unset: the record alone
                if is_main_process():
                    run.record.finish("crashed", last_epoch=self.done, error=error)
            raise
        finally:
            if previous_list is None:
                os.environ.pop(SKIP_LOG_ENV, None)
            else:
                os.environ[SKIP_LOG_ENV] = previous_list
            run.release()

    def _train(self, steps: StepLoop, period: int, first: int) -> dict:
        """Micro-steps ``first`` .. the end of ``period``; under a ``Recovery``, rolled back and trained
        again without the offending micro-steps when a loss is not finite."""
        periods, recovery = self.periods, self.recovery
        snap = recovery.snapshot(self.state) if recovery is not None else None
        skips: list[tuple[int, int]] = []
        while True:
            try:
                return self._train_segments(steps, period, first, skips)
            except NonFiniteLossError as e:
                if recovery is None or len(recovery.done) >= recovery.max_rollbacks:
                    if recovery is not None and is_main_process():
                        print(f"error: {len(recovery.done)} rollbacks spent (--max_rollbacks "
                              f"{recovery.max_rollbacks}); stopping", file=sys.stderr, flush=True)
                    raise
                accum = max(1, self.settings.accum)
                lo = max(first, e.step - e.step % accum - accum)
                hi = min(e.step - e.step % accum + accum, periods.size(period))
                skips = sorted(skips + [(lo, hi)])
                recovery.restore(self.state, snap)
                base = period * periods.length
                window = recovery.open_window(self.state, base + first, accum)
                entry = {"epoch": period, "step": e.step, "error": str(e), "skipped": [lo, hi]}
                lowered = ""
                if window is not None:
                    entry["lr_window"] = dict(window)
                    lowered = (f"; lr x {window['scale']:g} for {recovery.lr_window} optimizer steps from epoch "
                               f"{period}, step {first}")
                recovery.done.append(entry)
                if is_main_process():
                    print(f"warning: {e}: rolled back to epoch {period}, step {first} (rollback "
                          f"{len(recovery.done)} of at most {recovery.max_rollbacks}); training it again without "
                          f"micro-steps {lo}-{hi - 1}{lowered}", flush=True)

    def _train_segments(self, steps: StepLoop, period: int, first: int, skips: list[tuple[int, int]]) -> dict:
        """Train the micro-steps of ``period`` from ``first`` outside the ``skips`` windows [lo, hi);
        the period's statistics (several segments: losses weighted by their steps, times added)."""
        periods = self.periods
        size, bounds, start = periods.size(period), [], first
        for lo, hi in skips:
            if lo > start:
                bounds.append((start, lo))
            start = max(start, hi)
        if start < size or not bounds:
            bounds.append((start, size))
        parts = []
        for a, b in bounds:
            batches = self.loader.start(period, a)
            self.task.begin(period, a)
            parts.append((b - a, steps.run(batches if b == size else _Take(batches, b - a), period, a, b,
                                           self.task.compute_loss,
                                           lambda step: self.schedule(period, step, periods.length)
                                           * self.state.lr_factor(period * periods.length + step),
                                           periods.header(period), periods.count, periods.name(period))))
        if len(parts) == 1 and not skips:
            return parts[0][1]
        stats = dict(parts[-1][1])
        n = sum(k for k, _ in parts)
        elapsed = sum(p.get("epoch_time_s", 0.0) for _, p in parts)
        images = sum(p.get("images_per_sec", 0.0) * p.get("epoch_time_s", 0.0) for _, p in parts)
        stats.update(loss=sum(k * p["loss"] for k, p in parts) / max(n, 1), epoch_time_s=elapsed,
                     images_per_sec=images / max(elapsed, 1e-9), rollbacks=len(self.recovery.done),
                     skipped_steps=size - first - n)
        return stats

    def _end_period(self, period: int, clock: RunClock, skip_list: Path, trained_saved: bool = False) -> bool:
        """Evaluate (when due), checkpoint, log: the end of one period. True when the run exits here
        (--exit_after_epoch)."""
        self.stats = {**self.stats, **self.task.period_stats(period, self.stats)}
        state, stats, end, total = self.state, self.stats, self.periods.end(period), self.periods.total
        last = period + 1 == self.periods.count
        due = self.task.evaluates and self.eval_cadence.due(end, total)
        if due and not trained_saved:
            # the trained state first: a crash or a kill during the evaluation loses no training
            state.save(period, log_record=train_record(period, stats), append_log=False, evaluation_pending=stats)
            self.done = period
        evaluation = self.task.evaluate(period) if due else None
        improved = False
        if evaluation is not None:
            self.evaluation = evaluation
            if evaluation.score is not None:
                # the first evaluation writes checkpoint-best.pth even at a score of 0 (a smoke run's AP):
                # the file the docs evaluate always exists once a run has evaluated
                improved = evaluation.score > state.best or (
                    evaluation.score == state.best and not (Path(self.run.output_dir) / BEST_NAME).is_file())
                state.best = max(state.best, evaluation.score)
                state.best_epoch = period if improved else state.best_epoch
            evaluation.best = state.best
        record = {**train_record(period, stats), **(evaluation.record if evaluation is not None else {})}
        state.save(period, numbered=self.save_cadence.due(end, total), log_record=record,
                   extra=evaluation.checkpoint if evaluation is not None else None,
                   extra_names=(BEST_NAME,) if improved else ())
        self.done = period
        if is_main_process():
            self.task.log(period, stats, evaluation)
            self._log_stats(period)
            print(self._clock_line(clock, period), flush=True)
        wait_for_main_process(self.settings.dist_timeout)  # rank 0 scored, saved and logged alone
        check_skipped(stats, period, self.settings.max_skipped, skip_list)
        if period == self.exit_after and not last:
            if is_main_process():
                print(f"--exit_after_epoch {period}: checkpoint written; exiting", flush=True)
            self._finish("exited after epoch", period)
            cleanup()
            return True
        return False

    def _clock_line(self, clock: RunClock, period: int) -> str:
        """The end-of-period line in the program's unit (epochs, or segmentation's iterations)."""
        if self.periods.unit == "epoch":
            return clock.line(period)
        p = self.periods
        done = p.end(period) - p.end(clock.start_epoch - 1) if clock.start_epoch > 0 else p.end(period)
        elapsed = time.time() - clock.t0
        left = p.total - p.end(period)
        eta = elapsed / max(done, 1) * left
        return (f"iteration {p.end(period)}/{p.total} done; {datetime.timedelta(seconds=int(elapsed))} elapsed in "
                f"this run, run eta {datetime.timedelta(seconds=int(eta))} ({left} iterations left)")

    def _log_stats(self, period: int) -> None:
        """Rank 0: what every program reports per period (unreadable images, TensorBoard scalars)."""
        stats, writer = self.stats, self.run.log_writer
        if stats.get("skipped_images"):
            print(f"warning: {stats['skipped_images']} unreadable images skipped in {self.periods.name(period)} "
                  f"(all ranks)",
                  flush=True)
        if writer is not None:
            for key in ("loss", "images_per_sec", "peak_mem_mb", "peak_reserved_mb"):
                if key in stats:
                    writer.add_scalar(f"epoch/{key}", stats[key], period)
            writer.flush()

    def _complete(self) -> None:
        """The schedule ran to its end (every rank)."""
        run, state, last = self.run, self.state, self.periods.count - 1
        print(f"rank {run.rank}: final weights digest {weights_digest(state.model)}", flush=True)
        if is_main_process():
            best = self.task.best_text(state.best) if state.best_key else ""
            print(f"training time {datetime.timedelta(seconds=int(time.time() - run.start_time))}"
                  + (f"; {best}" if best else ""), flush=True)
        fields = self.task.complete(last, trained=self.first_period <= last)
        if is_main_process():
            run.close_log_writer()
        self._finish("completed", last, **fields)

    def _finish(self, status: str, last_period: int, **fields) -> None:
        """The summary line and the end of the run record (rank 0)."""
        if not is_main_process():
            return
        count, first = self.periods.count, self.first_period
        ran = max(0, last_period + 1 - first)
        if self.periods.unit == "epoch":
            epochs = (f"epochs {first}-{last_period} of {count} ({ran} in this run)" if ran else
                      f"no epoch to run ({count} done)" if first >= count else
                      f"no epoch completed in this run (it began at epoch {first} of {count})")
        else:  # segmentation counts iterations
            p = self.periods
            begun = p.end(first - 1) if first > 0 else 0
            epochs = (f"iterations {begun}-{p.end(last_period)} of {p.total} ({p.end(last_period) - begun} in this run)"
                      if ran else f"no iteration to run ({p.total} done)" if first >= count else
                      f"no evaluation interval completed in this run (it began at iteration {begun} of {p.total})")
        parts, record = self.task.finish(self.stats, self.evaluation, self.state.best, self.state.best_epoch)
        if self.recovery is not None and self.recovery.done:
            parts.append(f"{len(self.recovery.done)} rollback(s) after non-finite losses")
            record["rollbacks"] = list(self.recovery.done)
        self.run.summary(self.task.what, status, [epochs, *parts])
        self.run.record.finish(status, epochs_run=ran, last_epoch=last_period,
                               **{**record, **{k: v for k, v in fields.items() if v is not None}})


def train_record(period: int, stats: dict) -> dict:
    """The log.txt line of a period's training alone."""
    return {"epoch": period, **{f"train_{k}": v for k, v in stats.items()}}


def evaluate_only(run: Run, task: Task) -> int:
    """An evaluate-only run (--eval, --knn): evaluate, report, end the run record."""
    evaluation = task.evaluate(None)
    if is_main_process():
        what, parts = task.report(evaluation)
        run.summary(what, "completed", parts)
        run.record.finish("completed", metrics=evaluation.metrics)
    wait_for_main_process()  # rank 0 scored and wrote alone
    cleanup()
    return 0
