"""Start-up: what every program does before its first step, and the run it describes.

``start_run`` is where the side effects of a run begin: stop handlers (a stop during start-up
counts), the process group, the device, precision, seeds, loader workers, the lock on the output
folder (engine/output_lock.py, held for the life of the run), the run record and TensorBoard.
Everything before it (parsing flags, resolving them into a config) writes nothing.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from engine import output_lock, safe_archive
from engine.distributed import default_num_workers, init_distributed, is_dist, is_main_process
from engine.record import RunRecord, summary_line
from engine.step import resolve_amp, seed_rngs
from engine.stop import StopFlag, setup_stop_signals
from errors import UsageError


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The flags every program shares (config.cli.add_common_args): where outputs go, on what the
    run happens, how it resumes, checkpoints, logs and meets its peers."""
    output_dir: str                      # checkpoints, log.txt, run records, figures
    log_dir: Optional[str]               # TensorBoard (None: none)
    device: str                          # "cpu", "cuda" or "cuda:N" ("cuda:LOCAL_RANK" once started)
    seed: int
    resume: str                          # an explicit checkpoint to resume ("" : none)
    auto_resume: bool                    # resume from the newest good checkpoint in output_dir
    allow_changed_args: bool             # auto-resume even though run-shaping flags changed
    start_epoch: int                     # first epoch when not resuming
    num_workers: Optional[int]           # DataLoader workers per rank (None: start-up decides)
    pin_mem: bool
    amp: Optional[str]                   # "bf16", "fp16", "none" (None: start-up decides)
    bf16: bool                           # the reference's spelling of amp bf16 (resolved into amp)
    compile: bool
    cpu_tuning: bool
    cpu_matmul: str                      # "onednn" or "aten"
    save_freq: int                       # numbered checkpoints every N periods
    keep_last: int                       # numbered checkpoints kept (0: all)
    exit_after_epoch: int                # finish this period, checkpoint and exit (-1: never)
    max_skipped: Optional[int]           # unreadable samples a period may skip (None: 1%, at least 50; -1: any)
    print_freq: int                      # a progress line every N micro-steps
    world_size: int                      # processes (start-up sets the real one)
    local_rank: int                      # torch.distributed.launch's --local_rank
    dist_on_itp: bool                    # ranks from OpenMPI's variables
    dist_url: str
    dist_timeout: float                  # minutes a collective waits for a hung rank
    max_checkpoint_gb: Optional[float]   # largest checkpoint content loaded (None: scaled to the model)
    launch_command: tuple[str, ...] = field(default=(), metadata={"flag": False})  # argv, for the run record


@dataclass
class Run:
    """What start-up made of a run: the device, this process's place in the group, the stop flag,
    the run record, TensorBoard (rank 0, once opened) and the wall-clock start."""
    device: torch.device
    rank: int
    world: int
    stop: StopFlag
    record: RunRecord
    output_dir: str
    log_dir: Optional[str] = None
    start_time: float = field(default_factory=time.time)
    log_writer: Optional[object] = None
    lock: Optional[output_lock.FolderLock] = None

    @property
    def distributed(self) -> bool:
        """In a process group (a launcher's, one process included): the model is wrapped in DDP."""
        return is_dist()

    def open_log_writer(self) -> None:
        """TensorBoard on rank 0 when a log folder is set; a failing disk turns it off, not the run."""
        if is_main_process() and self.log_dir:
            from torch.utils.tensorboard import SummaryWriter
            _quiet_writer_thread()
            try:  # the writer's first event is written (and fails on a full disk) in its constructor
                writer = SummaryWriter(log_dir=self.log_dir)
            except OSError as e:
                TensorBoard.warn(self.log_dir, e)
                return
            self.log_writer = TensorBoard(writer, self.log_dir)

    def close_log_writer(self) -> None:
        if self.log_writer is not None:
            self.log_writer.close()

    def release(self) -> None:
        """Give up the output folder's lock (the run wrote its last file)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def log(self, *lines: str) -> None:
        """Rank 0 prints ``lines`` (empty ones are skipped)."""
        if is_main_process():
            for line in lines:
                if line:
                    print(line, flush=True)

    def note(self, banner: str, **fields) -> None:
        """Rank 0 prints the start-of-training banner; the run record keeps ``fields``."""
        self.log(banner)
        self.record.note(**fields)

    def summary(self, what: str, status: str, parts: list[str]) -> None:
        """Rank 0: the one-line summary of the run."""
        if is_main_process():
            print(summary_line(what, status, time.time() - self.start_time, parts, self.output_dir), flush=True)


def start_run(config, program: str):
    """Stop handlers first, then the process group, device, precision, seeds, loader workers and the
    run record. Returns the Run and ``config`` with what only start-up knows filled in (device,
    world size, precision, workers). On a GPU every program runs fp32 matmuls and convolutions in
    TF32 (the same numerics for pretraining, finetuning and dense prediction).

    ``config``: a program's config (a RunConfig and more), recorded whole in the run record."""
    stop = setup_stop_signals()
    safe_archive.configure(config.max_checkpoint_gb)
    for folder in (config.output_dir, config.log_dir):
        if folder:
            make_output_dir(folder)
    if config.dist_on_itp:  # OpenMPI's ranks, as torch.distributed reads them
        env = os.environ
        env["RANK"], env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env["OMPI_COMM_WORLD_LOCAL_RANK"]
    if config.local_rank >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(config.local_rank)
    place = init_distributed(config.device, config.dist_url, config.dist_timeout)
    device = torch.device(place.device)
    amp = resolve_amp(config.amp, device)
    seed_rngs(config.seed, place.rank)
    gpu_numerics(device)
    workers = config.num_workers if config.num_workers is not None else default_num_workers(device)
    config = replace(config, device=place.device, world_size=place.world, amp=amp, num_workers=workers)
    lock = lock_output_dir(config.output_dir, program)  # before anything is written into the folder
    record = RunRecord.start(config, program, device)
    run = Run(device, place.rank, place.world, stop, record, config.output_dir, config.log_dir, lock=lock)
    return run, config


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
    log folder, raised by its writer thread at the next call) is named once, and TensorBoard stays
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
                self.warn(self._log_dir, e)
                try:
                    self._writer.close()
                except OSError:
                    pass
                return None
        return guarded

    @staticmethod
    def warn(log_dir: str, e: OSError) -> None:
        print(f"warning: TensorBoard cannot write to {log_dir} ({type(e).__name__}: {e}); "
              f"training goes on without it", file=sys.stderr, flush=True)


def _quiet_writer_thread() -> None:
    """TensorBoard's writer thread re-raises its OSError (a full disk) after handing it to the writer,
    and threading prints it as a traceback; the writer's next call raises it again, where TensorBoard
    names it in one warning. Other threads' errors keep the previous hook."""
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard", False):
        return

    def hook(args) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)
    hook.quiet_tensorboard = True
    threading.excepthook = hook


def lock_output_dir(output_dir: str, program: str) -> Optional[output_lock.FolderLock]:
    """Rank 0 locks the output folder (engine/output_lock.py); every rank fails alike when it is taken."""
    lock, refusal = None, ""
    if is_main_process():
        try:
            lock = output_lock.acquire(output_dir, program, log=lambda m: print(m, flush=True))
        except UsageError as e:
            refusal = str(e)
    if is_dist():
        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise UsageError(refusal)
    return lock


def make_output_dir(path: str) -> None:
    """Create the folder and prove it is writable, or fail with one line."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"output folder {path} is not writable: {e.strerror or e}") from None


def wrap_for_training(model: nn.Module, run: Run, compile: bool = False) -> nn.Module:
    """DDP across the group (when distributed), then torch.compile (``compile``).

    Gradients are views into DDP's all-reduce buckets (``gradient_as_bucket_view``): no second copy
    of every gradient. Every parameter gets a gradient in every step of every model (tests), so
    ``find_unused_parameters`` stays off."""
    train_model = model
    if run.distributed:
        device = run.device
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if compile:
        train_model = torch.compile(train_model)
    return train_model
