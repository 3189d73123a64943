"""Stopping a run: stop signals, the agreement of ranks on a stop, and the end of an interrupted run.

A cluster stops a job by signalling every process of it: torchrun forwards what its agent receives,
SLURM signals the whole job step (SIGUSR2 ahead of preemption, SIGTERM at the time limit), and
``kill -- -PGID`` reaches DataLoader workers as well as ranks. The ranks turn the first signal into a
request (``StopFlag``), agree on the step at which to honour it (``StopAgreement``), write a resumable
checkpoint there and exit 0 (``finish_interrupted``); workers ignore the signals, which the ranks own.

Because workers ignore SIGTERM, the SIGTERM that multiprocessing sends its daemonic children when the
main process exits does not end them; ``end_workers`` (run at exit, before multiprocessing's own exit
handler joins them) ends them with SIGKILL instead, and each worker dies with its parent
(``PR_SET_PDEATHSIG``) when that exits without running its exit handlers (a second signal, SIGKILL).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing
import multiprocessing.util  # its exit handler must be registered before ours (atexit runs LIFO)
import os
import signal
import sys
import threading
import time
import warnings
from typing import Callable, Optional

import torch

from engine import checkpoint as ckpt_util
from engine.distributed import cleanup, get_world_size, is_main_process
from engine.state import save_training_state

_installed: Optional["StopFlag"] = None


class StopFlag:
    """Set by a stop signal; ``signum`` remembers which one (the SLURM wrapper requeues on USR2)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self.at = 0.0  # time.monotonic() of the first signal
        self.honoured = False  # the run wrote its checkpoint and ended because of it

    def __call__(self) -> bool:
        return self.requested


# Each asks for a checkpoint at the next step boundary. SIGUSR2 is SLURM/submitit's preemption signal
# (the submitit wrapper also requeues on it); SIGINT is Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
# The same signal again within this many seconds is the same request, not a second one: a signal sent
# to a process group reaches a rank directly and again through its launcher, which forwards what it got
# (torchrun's agent, submitit's local controller).
REPEAT_WINDOW_S = 3.0


def stop_exit_code(signum: int | None) -> int:
    """Exit status after a stop that wrote its checkpoint: 0 (torchrun and SLURM read success), except
    130 after Ctrl-C, so that a shell chain (``train && evaluate``) stops as a user who pressed it expects."""
    return 130 if signum == signal.SIGINT else 0


def setup_stop_signals() -> StopFlag:
    """SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT ask for a checkpoint at the next step boundary; a second
    signal exits at once with 128 + its number. Signals belong to the process, so the flag does too:
    ``stopped_by`` reads the one installed last."""
    global _installed
    state = _installed = StopFlag()
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked DataLoader worker before its worker_init_fn ignored the signals
            return
        name = signal.Signals(signum).name
        if state.requested:
            if signum == state.signum and time.monotonic() - state.at < REPEAT_WINDOW_S:
                return
            # os.write, not print: a handler may interrupt a print of the main thread (reentrant call)
            os.write(2, f"second signal {name}: exiting now\n".encode())
            os._exit(128 + signum)
        state.requested, state.signum, state.at = True, signum, time.monotonic()
        os.write(2, f"received {name}: checkpointing at the next step boundary\n".encode())

    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside some launchers)
            warnings.warn("stop signals not installed: not in the main thread")
            break
    return state


def stopped_by() -> int | None:
    """The signal that ended this process's last run with a checkpoint (None: it was not stopped).
    The SLURM wrapper requeues when this is SIGUSR2."""
    return _installed.signum if _installed is not None and _installed.honoured else None


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals, which the main process owns.

    A signal sent to the process group (``kill -- -PGID``, torchrun, scancel, SLURM's preemption
    signal) reaches every worker too; by default it would kill them, and the main process would fail
    with 'DataLoader worker is killed by signal' instead of checkpointing. Since SIGTERM no longer
    ends a worker, it is tied to its parent's life instead (``_die_with_parent``); the main process
    ends the workers left at its exit (``end_workers``)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _die_with_parent()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it ends (the rank's main thread,
    which creates the DataLoader iterators). Covers a parent that exits without its exit handlers
    (``os._exit`` after a second stop signal, SIGKILL, the OOM killer); torch's own check notices a dead
    parent only between batches, so a worker blocked on a read (a FIFO, a hung file system) would
    otherwise outlive it. Elsewhere than Linux, nothing to do."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl (an unusual libc): torch's parent check remains
        return
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


def end_workers(timeout: float = 5.0) -> list[int]:
    """SIGKILL and reap the daemonic child processes still alive (DataLoader workers); returns their pids.

    At interpreter exit multiprocessing sends its daemonic children SIGTERM and then joins them
    without a time limit. Workers ignore SIGTERM (``ignore_stop_signals``), so a process leaving
    with a loader still alive (an error raised while iterating: the traceback keeps the iterator)
    would wait for them for ever. Killing is safe here: workers only read data, and their results
    are no longer wanted. Registered to run at exit before multiprocessing's own handler; the
    programs' exit path (``config.cli.run_main``) also calls it directly."""
    alive = [p for p in multiprocessing.active_children() if p.daemon]
    if not alive:
        return []
    # torch's SIGCHLD handler would report each killed worker as a failure ('DataLoader worker is
    # killed by signal'), raised wherever the main thread is: these deaths are expected
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main else None
    try:
        for p in alive:
            p.kill()
        for p in alive:
            p.join(timeout)
    finally:
        if main:
            signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)
    return [p.pid for p in alive]


atexit.register(end_workers)


@contextlib.contextmanager
def stop_signals_held():
    """Block the stop signals while DataLoader workers start: a worker starts with them blocked (under
    any start method) until ``ignore_stop_signals`` ignores them; the main process receives any that
    arrived meanwhile when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StopRequested(Exception):
    """Raised at a step boundary after a stop signal asked the run to checkpoint and exit; ``step`` is
    the next step to run (0: before the epoch's first step)."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"stop requested at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


STOP_CHECK_EVERY = 4  # distributed runs agree on a stop request every N optimizer steps


def stop_check_due(step: int, accum: int, steps: int) -> bool:
    """Whether ranks agree on a stop request at this accumulation boundary: every
    STOP_CHECK_EVERY optimizer steps (counted in optimizer steps, whatever --accum_iter) and
    at the end of every epoch. The same answer on every rank."""
    return ((step + 1) // accum) % STOP_CHECK_EVERY == 0 or step + 1 == steps


class StopAgreement:
    """Whether to stop at a step boundary. Ranks receive a signal at slightly different times, so in a
    distributed run they agree (all-reduce MAX) every few optimizer steps (``stop_check_due``) and all
    stop at the same step; a single process stops at the first boundary.

    On a GPU the agreement never waits for the device: each check builds its flag on the device (no
    copy from host memory), all-reduces it, copies the result to pinned host memory behind an event,
    and reads the result of the *previous* check, whose event has long completed; so a request is
    honoured one check later than it arrived, on every rank at the same step. Elsewhere (gloo on
    the CPU, where the all-reduce is a host call anyway) each check reads its own result.
    """

    def __init__(self, stop_flag: Callable[[], bool], device: torch.device, pipelined: Optional[bool] = None) -> None:
        self.stop_flag, self.device = stop_flag, device
        self.pipelined = device.type == "cuda" if pipelined is None else pipelined
        self._pending: Optional[tuple[torch.Tensor, object]] = None  # (host result, its CUDA event or None)

    def __call__(self, step: int, accum: int, steps: int) -> bool:
        if get_world_size() == 1:
            return self.stop_flag()
        if not stop_check_due(step, accum, steps):
            return False
        if not self.pipelined:
            return _all_reduce_flag(self.stop_flag(), self.device)
        flag = torch.full((1,), 1.0 if self.stop_flag() else 0.0, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        event = None
        if flag.is_cuda:
            host = torch.empty(1, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        previous, self._pending = self._pending, (flag, event)
        if previous is None:
            return False
        if previous[1] is not None and not previous[1].query():  # recorded a check ago: finished long since
            previous[1].synchronize()
        return bool(previous[0].item())


def _all_reduce_flag(flag: bool, device: torch.device) -> bool:
    t = torch.full((1,), 1.0 if flag else 0.0, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def agreed_stop_now(stop_flag: Callable[[], bool], device: torch.device) -> bool:
    """Whether any rank has a stop request (every rank calls this at the same point; waits for the device,
    so it is for epoch boundaries)."""
    if get_world_size() == 1:
        return stop_flag()
    return _all_reduce_flag(stop_flag(), device)


def epoch_position(period: int, step: int) -> str:
    """Where a run stands, in epochs: 'epoch 3, step 10' (``step``: the next step of ``period``), or
    'the end of epoch 2' before period 3's first step."""
    return f"the end of epoch {period - 1}" if step == 0 else f"epoch {period}, step {step}"


def finish_interrupted(exc: Exception, flags, model, optimizer, scaler, stop, extra: Optional[dict] = None,
                       position: Callable[[int, int], str] = epoch_position) -> int:
    """End a run cut short by the training loop; returns the exit status.

    StopRequested (a stop signal, honoured at a step boundary): write a mid-epoch checkpoint
    and exit 0 (130 after SIGINT, ``stop_exit_code``). NonFiniteLossError: nothing is
    saved, the message names the last good checkpoint, exit 1. ``flags``: the run's RunFlags (engine.state);
    ``position(period, step)`` names the stop in the program's unit (engine.trainer.Periods.position).
    """
    if isinstance(exc, StopRequested):
        stop.honoured = True
        code = stop_exit_code(stop.signum)
        if exc.step == 0:
            # before the first step of a period: the checkpoint of the period before is already on
            # disk (written by the normal path, or the one this run resumed from)
            where = f"{position(exc.epoch, 0)} (already on disk)" if exc.epoch > 0 else "none needed"
        else:
            save_training_state(flags, exc.epoch, model, optimizer, scaler, next_step=exc.step, extra=extra)
            where = position(exc.epoch, exc.step)
        if is_main_process():
            print(f"stop signal: checkpoint written at {where}; exiting with status {code}", flush=True)
        cleanup()
        return code
    good = ckpt_util.list_checkpoints(flags.output_dir)
    print(f"error: {exc}; stopping. Last good checkpoint: {good[0] if good else 'none'}", file=sys.stderr, flush=True)
    cleanup()
    return 1
