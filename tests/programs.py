"""Start the programs as users do (a subprocess in the repository root), for the signal and fault tests."""
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_until(proc: subprocess.Popen, prefix: str) -> None:
    """Consume the program's output up to and including the first line that starts with ``prefix``."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return


def launch(args: list, until: str, **kwargs) -> subprocess.Popen:
    """``python *args`` with stderr merged into a text stdout; returns once a line starting with ``until`` is read."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, **kwargs)
    read_until(proc, until)
    return proc


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a program started with ``start_new_session``, its DataLoader
    workers and anything they started; a process orphaned by its parent's death keeps its session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the fields after the command name, which is in parentheses and may contain spaces
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat is the session id
            pids.append(int(entry.name))
    return pids


def kill_leftovers(leader: int, also_leader: bool = False) -> list[int]:
    """SIGKILL what is still alive in the session of ``leader`` (a program started with
    ``start_new_session``) besides the leader itself; returns those processes (before the kill).
    ``also_leader``: kill the leader too (a run past its time limit)."""
    left = [pid for pid in session_members(leader) if pid != leader]
    for pid in left + ([leader] if also_leader else []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def run_to_exit(args: list, timeout: float, **kwargs) -> tuple[int | None, str, list[int]]:
    """``python *args`` in a session of its own, stderr merged into stdout. Returns (exit status, output,
    processes of the session still alive once it exited); the status is None when it was still running
    after ``timeout`` seconds. Whatever is left of the session is killed before returning. The output
    goes to a file, not a pipe, so that a surviving worker holding it open cannot hide the exit."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *map(str, args)], stdout=log, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, start_new_session=True, **kwargs)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        left = kill_leftovers(proc.pid, also_leader=code is None)
        proc.wait()
        log.seek(0)
        return code, log.read(), left
