"""One run per output folder: an advisory lock held for the life of a run.

Every training program (``util.run.start_run``) and ``tools/make_shards.py`` lock their output
folder before writing into it. The lock is ``flock(2)`` on ``<folder>/.lock``; the file says who
holds it (program, PID, host, start time, SLURM job). A second run on the folder is refused with one
line naming the holder. The kernel releases the lock when its holder ends, however it ends (a
SIGKILL, a crash), so a dead run never blocks the folder: the next run takes the lock over and notes
whose it was. A run that ends normally clears the file.

Where the file system has no ``flock`` (some Lustre mounts), ``<folder>/.lock.pid``, created
exclusively, is the lock. It is taken over when its holder is a process of this host that no longer
exists, or an earlier run of the same SLURM job (a requeue); otherwise the message says how to
remove it.

Once it holds the lock, a run proves that the folder can hold its files: a 64 KiB file named
as long as the longest temporary file a run writes is written, synced and removed (a full disk, a
read-only mount or a path too long for the checkpoint names fail here, in one line, not after an
epoch of training).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Callable, Optional

from .cli import UsageError

LOCK_NAME = ".lock"
PID_LOCK_NAME = ".lock.pid"
# longer than the longest temporary name a run writes, ".checkpoint-best.pth.json.XXXXXXXX.tmp" (38 characters)
PROBE_LENGTH = 50
PROBE_BYTES = 64 * 1024
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_held: dict[str, "FolderLock"] = {}  # real path of the folder -> the lock this process holds on it


class FolderBusy(UsageError):
    """The output folder is locked by another run."""


def _me(program: str) -> dict:
    info = {"program": program, "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return info


def describe(holder: Optional[dict]) -> str:
    """'main_pretrain (PID 123 on host n1, since 2024-..., SLURM job 77)' from a lock file's record."""
    if not holder:
        return "another process (it has not written its name yet)"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (f"{holder.get('program', 'a program')} (PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')}{job})")


def _parse(data: bytes) -> Optional[dict]:
    try:
        holder = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _read_fd(fd: int) -> Optional[dict]:
    try:
        return _parse(os.pread(fd, 4096, 0))
    except OSError:
        return None


def _write_fd(fd: int, info: dict) -> None:
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _alive_here(holder: dict) -> bool:
    """Whether the holder is a live process of this host (True when that cannot be told)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _same_slurm_job(holder: dict) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    return bool(job) and holder.get("slurm_job") == job and holder.get("pid") != os.getpid()


def probe(folder: Path) -> None:
    """Write, sync and remove a file as large as PROBE_BYTES named as long as the longest temporary
    file of a run; one line naming the folder and the reason when that fails."""
    name = f".write-probe-{os.getpid()}-"
    path = folder / (name + "x" * (PROBE_LENGTH - len(name) - 4) + ".tmp")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise UsageError(f"output folder {folder}: its path ({len(str(folder.resolve()))} characters) is too "
                             f"long for the run's file names (temporary files of up to {PROBE_LENGTH} "
                             f"characters): choose a shorter --output_dir") from None
        raise UsageError(f"output folder {folder} cannot hold the run's files: {e.strerror or e}") from None


class FolderLock:
    """The lock of one output folder, held by this process until ``release``."""

    def __init__(self, folder: Path, fd: Optional[int], pid_file: Optional[Path]) -> None:
        self.folder, self.fd, self.pid_file = folder, fd, pid_file
        self.pid = os.getpid()

    def release(self) -> None:
        """Clear the holder's record and unlock (a forked child never releases its parent's lock)."""
        if os.getpid() != self.pid:
            return
        _held.pop(os.path.realpath(self.folder), None)
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None
        if self.pid_file is not None:
            try:
                holder = _parse(self.pid_file.read_bytes())
            except OSError:
                holder = None
            if holder is not None and holder.get("pid") == self.pid:
                self.pid_file.unlink(missing_ok=True)
            self.pid_file = None


def acquire(folder: str | os.PathLike, program: str, log: Callable[[str], None] = print,
            check_writable: bool = True) -> FolderLock:
    """Lock ``folder`` (created if needed) for this process, or raise FolderBusy naming the holder.

    A folder this process already holds is returned as it is (a program run twice in one process)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"output folder {folder} cannot be created: {e.strerror or e}") from None
    key = os.path.realpath(folder)
    held = _held.get(key)
    if held is not None and held.pid == os.getpid():
        return held
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UsageError(f"output folder {folder} is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_fd(fd)
        os.close(fd)
        raise FolderBusy(f"output folder {folder} is in use by {describe(holder)}: wait for that run to end, "
                         f"or choose another --output_dir") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_FLOCK:
            raise UsageError(f"output folder {folder} cannot be locked: {e.strerror or e}") from None
        return _acquire_pid_file(folder, program, log, check_writable)
    previous = _read_fd(fd)
    try:
        _write_fd(fd, _me(program))
    except OSError as e:
        os.close(fd)
        raise UsageError(f"output folder {folder} cannot hold the run's files: {e.strerror or e}") from None
    lock = FolderLock(folder, fd, None)
    _checked(lock, check_writable)
    if previous:
        log(f"note: took over the lock of {folder}: its holder, {describe(previous)}, is no longer running")
    _held[key] = lock
    return lock


def _checked(lock: FolderLock, check_writable: bool) -> None:
    """The holder proves the folder can hold the run's files; the lock is released when it cannot."""
    if not check_writable:
        return
    try:
        probe(lock.folder)
    except UsageError:
        lock.release()
        raise


def _acquire_pid_file(folder: Path, program: str, log: Callable[[str], None], check_writable: bool) -> FolderLock:
    """The lock where flock is missing: an exclusively created file naming the holder."""
    path = folder / PID_LOCK_NAME
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = _parse(path.read_bytes())
            except OSError:
                holder = None
            if holder is not None and (not _alive_here(holder) or _same_slurm_job(holder)):
                path.unlink(missing_ok=True)
                log(f"note: took over the lock of {folder}: its holder, {describe(holder)}, is no longer running")
                continue
            raise FolderBusy(f"output folder {folder} is in use by {describe(holder)} (file lock {path}; this "
                             f"file system has no flock): wait for that run to end, or delete {path} if it has "
                             f"ended, or choose another --output_dir") from None
        except OSError as e:
            raise UsageError(f"output folder {folder} is not writable: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(_me(program)))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            path.unlink(missing_ok=True)
            raise UsageError(f"output folder {folder} cannot hold the run's files: {e.strerror or e}") from None
        lock = FolderLock(folder, None, path)
        _checked(lock, check_writable)
        _held[os.path.realpath(folder)] = lock
        return lock
    raise FolderBusy(f"output folder {folder}: another run keeps taking its lock ({path})")
