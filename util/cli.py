"""Command-line pieces shared by the programs: common flags, validation, one-line errors."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError
from .cpu_perf import add_cpu_tuning_args, resolve_cpu_matmul


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, unless its help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text  # switches say in their text when they are on by default
        return super()._get_help_string(action)


# Minutes a collective waits for a hung rank. The ranks meet at every optimizer step; the longest
# legitimate gap is rank 0 alone writing a checkpoint or a figure (seconds to a minute for Swin-B with
# its optimizer on a network file system), so 3 minutes catches a hang 7 minutes sooner than the
# 10 minutes it was, with room to spare.
DIST_TIMEOUT_MIN = 3.0


class UsageError(ValueError):
    """A flag combination or input that cannot work; reported as one line before any compute."""


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, run records and figures")
    p.add_argument("--log_dir", default=None,
                   help="TensorBoard folder (default: OUTPUT_DIR/tensorboard; '' disables)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", default=0, type=int, help="seed of every random draw (data order, crops, masks, init)")
    p.add_argument("--resume", default="", help="resume from this checkpoint")
    p.add_argument("--auto_resume", action="store_true", default=True,
                   help="resume from the newest good checkpoint in --output_dir (default on)")
    p.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                   help="start from scratch even if --output_dir holds checkpoints")
    p.add_argument("--allow_changed_args", action="store_true",
                   help="auto-resume even though run-shaping flags (input size, effective batch, lr/blr, epochs, "
                        "warmup, mask flags, --finetune) differ from the checkpoint's; the differences are listed")
    p.add_argument("--start_epoch", default=0, type=int, help="first epoch when not resuming")
    p.add_argument("--num_workers", default=None, type=int,
                   help="DataLoader worker processes per rank (default: the CPUs available to each rank, at most "
                        "10, one fewer on a CPU device, whose training uses the same cores)")
    p.add_argument("--pin_mem", action="store_true", default=True, help="pin loaded batches in memory for CUDA runs (default on)")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin loaded batches")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast precision (default: bf16 on a GPU that supports it, none on CPU)")
    p.add_argument("--bf16", action="store_true", help="the reference's spelling of --amp bf16")
    p.add_argument("--clip_grad", type=float, default=None, help="gradient norm clipping (default off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_cpu_tuning_args(p)
    p.add_argument("--save_freq", default=20, type=int, help="write checkpoint-{epoch}.pth every N epochs")
    p.add_argument("--keep_last", default=0, type=int, help="keep only the newest K numbered checkpoints (0: all)")
    p.add_argument("--exit_after_epoch", default=-1, type=int,
                   help="finish this epoch, checkpoint and exit (the schedule still spans --epochs); "
                        "e.g. to fit a job's time slot")
    p.add_argument("--max_skipped", default=None, type=int,
                   help="end the run when an epoch skips more unreadable samples than this, all ranks together "
                        "(-1: never); default: 1%% of the epoch's samples, at least 50. Each skipped sample is "
                        "named in OUTPUT_DIR/skipped-samples.txt")
    p.add_argument("--print_freq", default=20, type=int, help="progress line every N steps")
    p.add_argument("--world_size", default=1, type=int, help="set by torchrun / submitit")
    p.add_argument("--local_rank", "--local-rank", default=-1, type=int, help="accepted for torch.distributed.launch")
    p.add_argument("--dist_on_itp", action="store_true", help="read the rank from OpenMPI variables")
    p.add_argument("--dist_url", default="env://", help="rendezvous URL")
    p.add_argument("--dist_timeout", default=DIST_TIMEOUT_MIN, type=float,
                   help=f"minutes a collective waits for a hung rank before the run fails (default "
                        f"{DIST_TIMEOUT_MIN:g}; raise it when ranks legitimately drift apart for longer, e.g. a slow "
                        f"shared file system at start-up)")
    p.add_argument("--max_checkpoint_gb", default=None, type=float,
                   help="largest checkpoint file content loaded (default: 8x the model's fp32 weights, at least "
                        "256 MB); see FINETUNE.md 'Loading checkpoints safely'")


def finalize_common_args(args) -> None:
    from . import safe_archive
    from .flag_checks import COMMON_RULES, check_existing, check_ranges
    check_existing(args, ["resume"])  # paths first: a typo fails before anything else is looked at
    check_ranges(args, COMMON_RULES)
    safe_archive.configure(getattr(args, "max_checkpoint_gb", None))
    if args.bf16:
        if args.amp not in (None, "bf16"):
            raise UsageError(f"--bf16 contradicts --amp {args.amp}")
        args.amp = "bf16"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} but no CUDA device is available; valid here: cpu")
    if not str(args.device).startswith(("cuda", "cpu")):
        raise UsageError(f"--device {args.device!r}: valid choices are cuda, cuda:N, cpu")
    if args.amp == "fp16" and not str(args.device).startswith("cuda"):
        raise UsageError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or --amp none")
    if args.dist_on_itp:
        env = os.environ
        env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
        env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env["OMPI_COMM_WORLD_LOCAL_RANK"]
    if args.local_rank >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    if args.log_dir is None:  # TensorBoard inside the run's folder
        args.log_dir = os.path.join(args.output_dir, "tensorboard")
    if args.log_dir == "":
        args.log_dir = None
    resolve_cpu_matmul(args)
    if getattr(args, "aa", None) in ("none", "None", ""):
        args.aa = None


def check_output_dir(path: str) -> None:
    """Create the folder and prove it is writable, or fail with one line."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"output folder {path} is not writable: {e.strerror or e}") from None


def check_output_dirs(args) -> None:
    """--output_dir and, when given, --log_dir: created and writable, or one line."""
    check_output_dir(args.output_dir)
    if args.log_dir:
        check_output_dir(args.log_dir)


def error_line(e: BaseException) -> str:
    """An error's message on one line. For an error raised in a DataLoader worker, torch re-raises it in
    the main process with the worker's whole traceback as its text; the worker's own message is its last
    entry (``<module>.<ErrorName>: <message>``), and is what is returned."""
    text = str(e).strip()
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        lines = text.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            head, sep, rest = lines[i].partition(": ")
            if sep and head.rsplit(".", 1)[-1] == type(e).__name__:
                text = " ".join([rest, *lines[i + 1:]])
                break
    return " ".join(text.split()) or type(e).__name__


def run_main(fn: Callable[[], int]) -> None:
    """Run a program's main and exit with its status. Usage and checkpoint errors, unusable data
    (``DataError``, also when a DataLoader worker found it) and file-system errors naming their file
    become one line on stderr; any other error keeps its traceback. Whatever the ending, DataLoader
    workers still alive are ended (``util.stop.end_workers``): they ignore SIGTERM, and the process
    would otherwise wait for them for ever at exit."""
    from .datasets import DataError
    from .stop import end_workers
    prog = os.path.basename(sys.argv[0])
    rank = os.environ.get("RANK")
    where = f"rank {rank}: " if rank is not None else ""
    try:
        code = fn()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    except CheckpointError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # Ctrl-C before the stop handlers were installed: nothing trained yet
        print(f"{prog}: interrupted before training started; nothing to save", file=sys.stderr)
        code = 130
    except DataError as e:
        print(f"{prog}: {where}error: {error_line(e)}", file=sys.stderr, flush=True)
        code = 1
    except OSError as e:
        if not e.filename:  # not about a file: an unexpected failure, whose traceback is wanted
            end_workers()
            raise
        print(f"{prog}: {where}error: {e}", file=sys.stderr, flush=True)
        code = 1
    except Exception:
        if rank is not None:  # a rank's failure reaches the log with its rank number
            print(f"{prog}: rank {rank} failed:", file=sys.stderr, flush=True)
        end_workers()  # before the traceback is printed: it holds the DataLoader iterator alive
        raise
    end_workers()
    sys.exit(code)
