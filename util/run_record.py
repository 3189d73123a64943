"""Run records: what a run was started with, on what, and how it ended.

Every start of a program writes ``run-NNN.json`` into ``--output_dir`` (rank 0; the next free
number, so a reused folder keeps the records of earlier runs and resumes): the full arguments,
the command line, the versions of Python, torch, torchvision, timm and CUDA, the git commit of
the code when it is a git checkout, the world size and every rank's device. At the end the same
file gets a ``finished`` entry (status, wall time, final metrics), and the program prints the
one-line summary made by :func:`summary_line`. A run that ends otherwise (outside the training loop,
which records its own ends) gets ``finished`` when the interpreter exits: ``crashed`` with an
uncaught exception, ``failed`` after a one-line error.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .distributed import get_rank, get_world_size, is_dist

ROOT = Path(__file__).resolve().parents[1]
RECORD_PREFIX = "run-"


def format_duration(seconds: float) -> str:
    """H:MM:SS (hours may exceed 24)."""
    s = int(max(seconds, 0) + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def git_state(root: Path = ROOT) -> Optional[dict]:
    """Commit and whether tracked files differ from it; None outside a git checkout or without git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def versions() -> dict:
    import timm
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": __import__("numpy").__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "platform": platform.platform()}


def cpu_name() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def write_report(report: dict, table: str, json_path: Optional[str]) -> dict:
    """A benchmark's ending: print its markdown ``table``, write ``report`` as JSON when asked."""
    print(table, flush=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def this_device(device: torch.device) -> dict:
    """The device this rank trains on, in words."""
    info = {"rank": get_rank(), "host": socket.gethostname(), "device": str(device)}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    else:
        info["name"] = cpu_name()
        info["threads"] = torch.get_num_threads()
    return info


def _json_default(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    return repr(v)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


class RunRecord:
    """Start and finish of one run; call :meth:`start` on every rank (the device list is gathered)."""

    def __init__(self, path: Optional[Path], record: dict) -> None:
        self.path, self.record = path, record
        self.t0 = time.time()
        if path is not None:  # a run that ends any other way still closes its record
            atexit.register(self._close_unfinished)

    def _close_unfinished(self) -> None:
        """At exit, a record without ``finished`` gets one: ``crashed`` with the uncaught exception, else
        ``failed`` (a one-line error ended the program). The training loop records its own ends; this
        covers start-up and the programs' own code."""
        if self.path is None or "finished" in self.record or not self.path.parent.is_dir():
            return
        error = getattr(sys, "last_value", None)
        if error is not None:
            self.finish("crashed", error=f"{type(error).__name__}: {error}"[:2000])
        else:
            self.finish("failed", error="the program ended before the run finished (its log has the reason)")

    @classmethod
    def start(cls, args, program: str, device: torch.device) -> "RunRecord":
        mine = this_device(device)
        devices = [mine]
        if is_dist():
            devices = [None] * get_world_size()
            torch.distributed.all_gather_object(devices, mine)
        if get_rank() != 0:
            return cls(None, {})
        argv = getattr(args, "launch_command", None) or [sys.argv[0], *sys.argv[1:]]
        env_keys = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "LOCAL_WORLD_SIZE",
                    "MASTER_ADDR")
        record = {
            "program": program,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable), *argv]),
            "argv": list(argv),
            "cwd": os.getcwd(),
            "args": dict(sorted(vars(args).items())),
            "versions": versions(),
            "git": git_state(),
            "world_size": get_world_size(),
            "devices": devices,
            "environment": {k: os.environ[k] for k in env_keys if k in os.environ},
        }
        out = Path(args.output_dir)
        path = None
        try:
            out.mkdir(parents=True, exist_ok=True)
            path = cls._claim(out)
            _write_json(path, record)
        except OSError as e:  # a full or read-only disk: one line, and no empty record left behind
            if path is not None:
                path.unlink(missing_ok=True)
            from .cli import UsageError
            raise UsageError(f"cannot write the run record in {out}: {e.strerror or e}") from None
        return cls(path, record)

    @staticmethod
    def _claim(out: Path) -> Path:
        """The next free run-NNN.json, created exclusively (two runs never share a number)."""
        taken = [int(p.stem[len(RECORD_PREFIX):]) for p in out.glob(f"{RECORD_PREFIX}*.json")
                 if p.stem[len(RECORD_PREFIX):].isdigit()]
        n = max(taken, default=0) + 1
        while True:
            path = out / f"{RECORD_PREFIX}{n:03d}.json"
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                return path
            except FileExistsError:
                n += 1

    def note(self, **fields) -> None:
        """Add facts learnt after the start (e.g. the checkpoint resumed from)."""
        if self.path is not None:
            self.record.update(fields)
            self._write()

    def finish(self, status: str, **fields) -> None:
        """The ``finished`` entry: status (completed, stopped, failed, crashed, ...), time, results."""
        if self.path is None:
            return
        self.record["finished"] = {
            "status": status, "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(time.time() - self.t0, 3), **fields}
        self._write()

    def _write(self) -> None:
        """A record that cannot be updated (the disk filled up) is named, never the end of the run."""
        try:
            _write_json(self.path, self.record)
        except OSError as e:
            print(f"warning: cannot update the run record {self.path}: {e.strerror or e}", file=sys.stderr, flush=True)


def summary_line(what: str, status: str, wall_s: float, parts: list[str], output_dir: str) -> str:
    """One line for the end of a run: ``summary: <what> <status> in H:MM:SS; part; part; outputs: <dir>``."""
    body = "; ".join([f"{what} {status} in {format_duration(wall_s)}", *parts, f"outputs: {Path(output_dir).resolve()}"])
    return f"summary: {body}"


class RunClock:
    """Whole-run ETA from the wall time of the epochs completed in this process (training, evaluation,
    checkpoints and figures included)."""

    def __init__(self, start_epoch: int, epochs: int) -> None:
        self.start_epoch, self.epochs = start_epoch, epochs
        self.t0 = time.time()

    def line(self, epoch: int) -> str:
        done = epoch + 1 - self.start_epoch
        elapsed = time.time() - self.t0
        left = self.epochs - epoch - 1
        eta = elapsed / max(done, 1) * left
        return (f"epoch {epoch + 1}/{self.epochs} done; {format_duration(elapsed)} elapsed in this run, "
                f"run eta {format_duration(eta)} ({left} epochs left)")
