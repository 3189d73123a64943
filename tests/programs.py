"""Start the programs as users do (a subprocess in the repository root), for the signal and fault tests."""
import subprocess
import sys
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
