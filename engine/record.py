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
import dataclasses
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

from engine.distributed import get_rank, get_world_size, is_dist
from errors import UsageError

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
    def start(cls, config, program: str, device: torch.device) -> "RunRecord":
        """``config``: the run's resolved config (a dataclass), recorded whole under ``args``."""
        mine = this_device(device)
        devices = [mine]
        if is_dist():
            devices = [None] * get_world_size()
            torch.distributed.all_gather_object(devices, mine)
        if get_rank() != 0:
            return cls(None, {})
        argv = list(config.launch_command) or [sys.argv[0], *sys.argv[1:]]
        env_keys = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "LOCAL_WORLD_SIZE",
                    "MASTER_ADDR")
        record = {
            "program": program,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable), *argv]),
            "argv": list(argv),
            "cwd": os.getcwd(),
            "args": dict(sorted(dataclasses.asdict(config).items())),
            "versions": versions(),
            "git": git_state(),
            "world_size": get_world_size(),
            "devices": devices,
            "environment": {k: os.environ[k] for k in env_keys if k in os.environ},
        }
        out = Path(config.output_dir)
        path = None
        try:
            out.mkdir(parents=True, exist_ok=True)
            path = cls._claim(out)
            _write_json(path, record)
        except OSError as e:  # a full or read-only disk: one line, and no empty record left behind
            if path is not None:
                path.unlink(missing_ok=True)
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


# ---------------------------------------------------------------- cost report: FLOPs, peaks, utilisation

# Dense peaks (no structured sparsity) in TFLOP/s from the vendors' data sheets: (bf16/fp16, fp32).
# fp32 is the TF32 tensor-core peak where the GPU has one: the programs train fp32 matmuls in TF32
# (engine.run.gpu_numerics). Matched in order against torch.cuda.get_device_name: longer names first.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4, 494.7), ("H100 NVL", 835.5, 417.8), ("H100 PCIe", 756.0, 378.0), ("H100", 989.4, 494.7),
    ("GH200", 989.4, 494.7), ("A100", 312.0, 156.0), ("L40S", 362.1, 183.2), ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0), ("A10", 125.0, 62.5), ("RTX 4090", 165.2, 82.6), ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),
)


def count_flops(fn) -> int:
    """FLOPs of whatever ``fn()`` runs (matmuls and convolutions, attention included), counted by
    torch.utils.flop_counter with attention on SDPA's math kernel so that its matmuls are seen."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return int(counter.get_total_flops())


def measured_gemm_peak(device: torch.device, dtype: torch.dtype, n: int = 512, reps: int = 5) -> float:
    """FLOP/s of a square ``n`` matmul on ``device`` in ``dtype``: the median of ``reps``."""
    a = torch.ones(n, n, device=device, dtype=dtype)
    b = torch.ones(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return 2 * n ** 3 / max(times[len(times) // 2], 1e-12)


def device_peak(device: torch.device, amp: str) -> tuple[Optional[float], str]:
    """The peak FLOP/s of one device at the run's precision and where it comes from: the table above
    on a known GPU, a measured GEMM on CPU, None on an unknown GPU."""
    low = amp in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, half, single in GPU_PEAK_TFLOPS:
            if key in name:
                return (half if low else single) * 1e12, f"{key} {'bf16' if low else 'tf32'} data-sheet peak"
        return None, f"no peak known for {name}"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    return measured_gemm_peak(device, dtype), f"measured {str(dtype).removeprefix('torch.')} GEMM"


def flops_text(flops_per_s: float) -> str:
    """FLOP/s in G or T, three significant figures or more."""
    return f"{flops_per_s / 1e12:.3f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.2f} GFLOP/s"


class CostMeter:
    """Per period: achieved FLOP/s, model FLOP utilisation, device-hours per 100 epochs and the
    projection of the whole run at the measured rate. ``flops_per_image``: forward + backward of one
    training image (count_flops); ``peak``: FLOP/s of one device (None: no utilisation)."""

    def __init__(self, flops_per_image: int, params: int, peak: Optional[float], peak_source: str, world: int,
                 images_per_epoch: int, epochs: int) -> None:
        self.flops_per_image, self.params, self.peak, self.peak_source = flops_per_image, params, peak, peak_source
        self.world, self.images_per_epoch, self.epochs = world, images_per_epoch, epochs

    def start(self) -> dict:
        """What the run record keeps at start-up."""
        return {"flops_per_image": self.flops_per_image, "params": self.params, "peak_flops_per_device": self.peak,
                "peak_source": self.peak_source}

    def stats(self, images_per_sec: float, epochs_left: int) -> dict:
        """The cost of a period that trained ``images_per_sec`` (all ranks), and of ``epochs_left`` more."""
        flops = images_per_sec * self.flops_per_image
        epoch_s = self.images_per_epoch / max(images_per_sec, 1e-12)
        out = {"flops_per_s": flops,
               "mfu": flops / (self.peak * self.world) if self.peak else None,
               "device_hours_per_100_epochs": 100 * epoch_s * self.world / 3600,
               "projected_run_wall_s": epoch_s * self.epochs,
               "projected_run_device_hours": epoch_s * self.epochs * self.world / 3600,
               "projected_left_wall_s": epoch_s * epochs_left}
        return out

    def line(self, stats: dict) -> str:
        mfu = f"MFU {100 * stats['mfu']:.1f}% of {flops_text(self.peak)} per device ({self.peak_source})" \
            if stats.get("mfu") is not None else f"MFU unknown ({self.peak_source})"
        return (f"cost: {flops_text(stats['flops_per_s'])} achieved, {mfu}; "
                f"{stats['device_hours_per_100_epochs']:.2f} device-hours per 100 epochs x {self.world} device(s); "
                f"the whole run at this rate: {stats['projected_run_device_hours']:.2f} device-hours, wall "
                f"{format_duration(stats['projected_run_wall_s'])} ({format_duration(stats['projected_left_wall_s'])} "
                f"left)")
