"""Re-run the fault cases of the shards / decoding / dense-data / process-fault pass against this tree.

    OMP_NUM_THREADS=1 python tools/fault_rerun.py                    # every case (~15 min on 2 cores)
    OMP_NUM_THREADS=1 python tools/fault_rerun.py --cases T1b C8 P2b # some; their rows replace those in the JSON

Each case builds its fixture offline and small (tests/tiny_data.py photos through tools/make_shards.py,
tools/make_tiny_coco.py, segmentation/toy.py), edits a copy the way a user's cluster breaks it, and runs
the real programs (main_pretrain.py, main_finetune.py, main_detection.py, main_segmentation.py,
tools/make_shards.py, tools/reconstruct.py, tools/export_backbone.py) as a user would: in a session of
its own, under an address-space cap (RLIMIT_AS) and a wall-clock limit that kills the whole process
group. Per run it records the exit status, the seconds, the first message line, the processes of the
session still alive after the exit, the largest process's peak RSS and what the output folder holds;
then each case checks the behaviour the program promises (named and skipped, refused in one line, no
hang, resumed to the weights of an uninterrupted run, ...) and says pass or fail with the reason.

The "before" column is the verdict of the same case on an earlier version of the code. Prints
a markdown table and writes benchmarks/faults_rerun.json and benchmarks/faults_rerun.md. Output
folders on small or full disks are tmpfs mounts (root only; without root those cases fail with the
reason). Not part of the test suite: the cases are the tests' scenarios at the size users meet them.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from programs import kill_leftovers  # noqa: E402  (tests/programs.py: ends what a run left in its session)
from tiny_data import make_labelled  # noqa: E402  (72-px three-class photos)

PY = sys.executable
GB = 1 << 30

# The command shorthands of the table (PRE, FT, DET, SEG; W2 = the same with two DataLoader workers).
PRE = ["main_pretrain.py", "--model", "mae_swin_pico_128", "--mask_regular", "--vis_mask_ratio", "0.25",
       "--norm_pix_loss", "--device", "cpu", "--log_dir", "", "--batch_size", "2", "--epochs", "1",
       "--num_workers", "0"]
FT = ["main_finetune.py", "--model", "swin_pico_128", "--batch_size", "2", "--epochs", "1", "--num_workers", "0",
      "--warmup_epochs", "0", "--device", "cpu", "--log_dir", ""]
DET = ["main_detection.py", "--model", "swin_pico_128", "--input_size", "64", "--test_size", "64", "64",
       "--batch_size", "2", "--adapter_dim", "32", "--fpn_dim", "32", "--warmup_iters", "1", "--lr", "1e-3",
       "--num_workers", "0", "--device", "cpu", "--log_dir", "", "--epochs", "1"]
SEG = ["main_segmentation.py", "--model", "swin_pico_128", "--input_size", "64", "--img_scale", "96", "64",
       "--batch_size", "2", "--channels", "32", "--aux_channels", "16", "--warmup_iters", "1", "--num_workers", "0",
       "--device", "cpu", "--log_dir", "", "--test_stride", "48", "--nb_classes", "4", "--iters", "6",
       "--eval_interval", "3"]


def flag(cmd: Sequence[str], name: str, *values: str) -> list[str]:
    """``cmd`` with flag ``name`` set to ``values`` (replaced where present, appended otherwise; no value:
    the flag and its values removed)."""
    cmd = list(cmd)
    if name in cmd:
        i = cmd.index(name)
        j = i + 1
        while j < len(cmd) and not cmd[j].startswith("--"):
            j += 1
        del cmd[i:j]
        if values:
            cmd[i:i] = [name, *values]
    elif values:
        cmd += [name, *values]
    return cmd


W2 = lambda cmd: flag(cmd, "--num_workers", "2")  # noqa: E731


# ----------------------------------------------------------------------------------------------- running

@dataclass
class Run:
    """One program run: what a user sees of it."""
    cmd: list[str]
    rc: Optional[int]               # None: still running at the time limit (then killed)
    seconds: float
    output: str
    left: list[int]                 # processes of its session alive after the main one exited
    peak_mb: float                  # largest process of the tree (ru_maxrss of wait4)
    out_dir: Optional[Path] = None
    disk: list[str] = field(default_factory=list)
    holds: str = "-"                # disk_summary, taken when the run ended (a tmpfs is gone later)

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.output

    @property
    def hung(self) -> bool:
        return self.rc is None or bool(self.left)

    def has(self, *words: str) -> bool:
        low = self.output.lower()
        return all(w.lower() in low for w in words)

    def message(self) -> str:
        """The line a user reads first: a traceback's last line, else (a failed run) its error line, else
        the first warning / error / note / skip line, else the last line."""
        lines = [ln.strip() for ln in self.output.splitlines() if ln.strip() and "%|" not in ln]
        if self.traceback:
            tail = [ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception|Interrupt)\b", ln)]
            return "traceback: " + (tail[-1] if tail else lines[-1])
        errors = [ln for ln in lines if "error:" in ln]
        if self.rc not in (0, None) and errors:
            return errors[0]
        key = re.compile(r"(error|warning|skipp|refus|cannot|note:|in use|stop signal|continuing|resumed|"
                         r"trained, its evaluation|took over|removed \d|unreadable|named|left out|limit)", re.I)
        for ln in lines:
            if key.search(ln) and not ln.startswith(("Epoch [", "Iter [")):
                return ln
        return lines[-1] if lines else ""


def _cap(limit: Optional[int]):
    def pre() -> None:
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return pre


Action = tuple[Callable[[str], bool], float, Callable[[subprocess.Popen], None]]


def run(cmd: Sequence[str], out_dir: Optional[Path] = None, timeout: float = 180, cap: Optional[int] = 6 * GB,
        actions: Sequence[Action] = (), env: Optional[dict] = None, python: bool = True) -> Run:
    """Run ``python cmd`` (``--output_dir out_dir`` added when given) in its own session under an RLIMIT_AS
    of ``cap`` bytes; kill the whole session at ``timeout`` s. ``actions``: in order, (ready(output so
    far), delay s, do(proc)) -- e.g. send SIGTERM to the group 0.3 s after a progress line."""
    cmd = [str(c) for c in cmd]
    if out_dir is not None and "--output_dir" not in cmd:
        cmd += ["--output_dir", str(out_dir)]
    argv = ([PY] if python else []) + cmd
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    todo = list(actions)
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=environ,
                                start_new_session=True, preexec_fn=_cap(cap))
        rc, peak, due = None, 0.0, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                rc, peak = os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024
                proc.returncode = rc
                break
            if time.monotonic() - t0 > timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode, peak = os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024
                break
            if todo:
                log.flush()
                log.seek(0)
                text = log.read()
                ready, delay, do = todo[0]
                if due is None and ready(text):
                    due = time.monotonic() + delay
                if due is not None and time.monotonic() >= due:
                    do(proc)
                    todo.pop(0)
                    due = None
            time.sleep(0.02)
        seconds = time.monotonic() - t0
        left = kill_leftovers(proc.pid)
        log.seek(0)
        output = log.read()
    r = Run(cmd, rc, round(seconds, 1), output, left, round(peak, 0), out_dir)
    r.disk = listing(out_dir)
    r.holds = disk_summary(r)
    return r


def group(sig: int) -> Callable[[subprocess.Popen], None]:
    def do(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    return do


def line(pattern: str) -> Callable[[str], bool]:
    rx = re.compile(pattern, re.M)
    return lambda text: bool(rx.search(text))


def listing(folder: Optional[Path]) -> list[str]:
    if folder is None or not folder.is_dir():
        return []
    with contextlib.suppress(OSError):
        return sorted(p.name for p in folder.iterdir())
    return []


def disk_summary(r: Run) -> str:
    """What the output folder holds: checkpoints, the run record's end, other files."""
    if r.out_dir is None:
        return "-"
    names = r.disk
    if not names and not r.out_dir.exists():
        return "no folder"
    ckpts = [n[len("checkpoint-"):-4] for n in names if n.startswith("checkpoint-") and n.endswith(".pth")]
    parts = [f"ckpt {','.join(ckpts)}"] if ckpts else []
    records = [n for n in names if re.fullmatch(r"run-\d+\.json", n)]
    for rec in records:
        try:
            fin = json.loads((r.out_dir / rec).read_text()).get("finished") or {}
            parts.append(f"{rec[:-5]} {fin.get('status', 'no finished entry')}")
        except (OSError, ValueError):
            parts.append(f"{rec[:-5]} unreadable")
    temps = [n for n in names if n.endswith(".tmp")]
    if temps:
        parts.append(f"{len(temps)} temp")
    if "skipped-samples.txt" in names:
        parts.append("skipped-samples.txt")
    return "; ".join(parts) or ("empty" if not [n for n in names if n != ".lock"] else ", ".join(names[:4]))


def weights_digest(ckpt: Path) -> str:
    """SHA-256 over the model tensors of a checkpoint (names and bytes), independent of the pickle."""
    from engine.checkpoint import safe_load  # the project's loader: no pickled code runs
    state = safe_load(ckpt)["model"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- fixtures

class Fixtures:
    """The pass's fixtures, built once per invocation under ``work``: shards (18 + 9 72-px PNGs, shards
    of 5), images200 / shards200 (200 48-px JPEGs, shards of 20), coco / coco40 (4+2 / 40+40 64-px
    images), ade / ade20 (6+3 / 20+20 pairs), a pico pretraining checkpoint."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.base = work / "fixtures"
        self.base.mkdir(parents=True, exist_ok=True)

    def _once(self, name: str, build: Callable[[Path], None]) -> Path:
        path = self.base / name
        if not path.exists():
            tmp = self.base / f".{name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            tmp.rename(path)
        return path

    def _tool(self, *args: str) -> None:
        r = run(list(args), timeout=600, cap=None)
        if r.rc != 0:
            raise RuntimeError(f"fixture step failed: {' '.join(args)}\n{r.output[-2000:]}")

    @property
    def labelled(self) -> Path:
        return self._once("labelled", lambda p: make_labelled(p))

    @property
    def shards(self) -> Path:
        src = self.labelled
        return self._once("shards", lambda p: self._tool("tools/make_shards.py", "--data_path", src,
                                                          "--output_dir", p, "--shard_size", "5"))

    @property
    def images200(self) -> Path:
        def build(p: Path) -> None:
            import numpy as np
            from PIL import Image
            p.mkdir(parents=True)
            rng = np.random.default_rng(0)
            for i in range(200):
                base = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
                Image.fromarray(base).resize((48, 48), Image.BICUBIC).save(p / f"img_{i:03d}.jpg", quality=90)
        return self._once("images200", build)

    @property
    def shards200(self) -> Path:
        src = self.images200
        return self._once("shards200", lambda p: self._tool("tools/make_shards.py", "--data_path", src,
                                                             "--output_dir", p, "--shard_size", "20"))

    def _coco(self, name: str, n_train: int, n_val: int) -> Path:
        return self._once(name, lambda p: self._tool("tools/make_tiny_coco.py", "--out", p, "--train", str(n_train),
                                                      "--val", str(n_val), "--size", "64"))

    @property
    def coco(self) -> Path:
        return self._coco("coco", 4, 2)

    @property
    def coco40(self) -> Path:
        return self._coco("coco40", 40, 40)

    def _ade(self, name: str, n_train: int, n_val: int) -> Path:
        return self._once(name, lambda p: self._tool("-m", "segmentation.toy", p, "--train", str(n_train),
                                                      "--val", str(n_val)))

    @property
    def ade(self) -> Path:
        return self._ade("ade", 6, 3)

    @property
    def ade20(self) -> Path:
        return self._ade("ade20", 20, 20)

    @property
    def pretrain_checkpoint(self) -> Path:
        data = self.shards
        folder = self._once("pre_run", lambda p: self._tool(*PRE, "--data_path", data, "--output_dir", p))
        return folder / "checkpoint-last.pth"


# ----------------------------------------------------------------------------------------------- edits

def copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)
    return dst


Member = tuple[tarfile.TarInfo, bytes]


def read_tar(path: Path) -> list[Member]:
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read() if m.isfile() else b"") for m in tf.getmembers()]


def write_tar(path: Path, members: Sequence[Member]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            info = tarfile.TarInfo(info.name) if isinstance(info, str) else info
            if info.isfile():
                info.size = len(data)
                tf.addfile(info, _bytes(data))
            else:
                tf.addfile(info)


def _bytes(data: bytes):
    import io
    return io.BytesIO(data)


def member(name: str, data: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o444
    return info, data


def png_bytes(seed: int = 0, size: int = 72) -> bytes:
    import io
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sample(key: str, cls: int = 0, seed: int = 0) -> list[Member]:
    return [member(f"{key}.png", png_bytes(seed)), member(f"{key}.cls", str(cls).encode())]


def edit_index(folder: Path, split: str, edit: Callable[[dict], None]) -> None:
    path = folder / f"{split}.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index, indent=1))


def refresh_sizes(folder: Path, split: str = "train") -> None:
    """The index's recorded file sizes set to the files' (an edit that a user re-indexed by hand)."""
    def edit(index: dict) -> None:
        for s in index["shardlist"]:
            s["filesize"] = (folder / s["url"]).stat().st_size
    edit_index(folder, split, edit)


def sparse_member_tar(path: Path, big_name: str, big_size: int, rest: Sequence[Member]) -> None:
    """A tar whose first member declares and holds ``big_size`` bytes of zeros, written as a hole (the
    file is sparse on disk, its bytes are really there for a reader)."""
    info = tarfile.TarInfo(big_name)
    info.size, info.mode = big_size, 0o444
    with open(path, "wb") as f:
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.seek(-(-big_size // 512) * 512, os.SEEK_CUR)
        for m, data in rest:
            m.size = len(data)
            f.write(m.tobuf(format=tarfile.GNU_FORMAT))
            f.write(data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, fill: int = 0, read_only: bool = False):
    """A tmpfs of ``size`` mounted at ``path`` (``fill`` bytes taken by a file, or every byte if -1)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                   capture_output=True)
    try:
        if fill:
            with contextlib.suppress(OSError), open(path / "filler", "wb") as f:
                chunk = b"\0" * 4096
                written = 0
                while fill < 0 or written < fill:
                    f.write(chunk)
                    f.flush()
                    written += len(chunk)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def load_json(p: Path) -> dict:
    return json.loads(p.read_text())


def save_json(p: Path, d) -> None:
    p.write_text(json.dumps(d))


# ----------------------------------------------------------------------------------------------- verdicts

def verdict(checks: Sequence[tuple[bool, str]]) -> str:
    """pass, or fail with the first unmet expectation."""
    for ok, why in checks:
        if not ok:
            return f"fail: {why}"
    return "pass"


def clean(r: Run) -> list[tuple[bool, str]]:
    """Ended by itself, no DataLoader worker or child left, no traceback."""
    return [(r.rc is not None, f"still running after {r.seconds:.0f} s (killed)"),
            (not r.left, f"{len(r.left)} process(es) of its session left alive"),
            (not r.traceback, "a traceback instead of one line")]


def refused(r: Run, *words: str) -> list[tuple[bool, str]]:
    """Refused (non-zero status) in one line that names ``words``."""
    return clean(r) + [(r.rc not in (0, None), f"status {r.rc}, not refused"),
                       (r.has(*words), f"the output does not name {' / '.join(words)}")]


def completed(r: Run, *words: str) -> list[tuple[bool, str]]:
    """Finished with status 0, naming ``words`` (what was skipped and why)."""
    return clean(r) + [(r.rc == 0, f"status {r.rc}"), (r.has(*words), f"the output does not name {' / '.join(words)}")]


def before_training(r: Run) -> tuple[bool, str]:
    return (not re.search(r"^(Epoch|Iter) \[", r.output, re.M), "found after training had started")


# ----------------------------------------------------------------------------------------------- cases

@dataclass
class Result:
    runs: list[Run]
    verdict: str
    note: str = ""


@dataclass
class Case:
    id: str
    setup: str
    command: str
    before: str
    body: Callable[["Ctx"], Result]


@dataclass
class Ctx:
    fx: Fixtures
    dir: Path           # this case's scratch folder

    def out(self, name: str = "out") -> Path:
        return self.dir / name


CASES: list[Case] = []


def case(cid: str, setup: str, command: str, before: str):
    def register(fn: Callable[[Ctx], Result]) -> Callable[[Ctx], Result]:
        CASES.append(Case(cid, setup, command, before, fn))
        return fn
    return register


# --- 1. tar shards and make_shards

def _truncated(c: Ctx) -> Path:
    d = copy(c.fx.shards, c.dir / "data")
    with open(d / "train-000001.tar", "r+b") as f:
        f.truncate(30000)
    return d


@case("T1a", "train-000001.tar cut at 30,000 of 92,160 bytes (inside a member); index present", "PRE",
      "partial: named, but a mid-epoch traceback")
def t1a(c: Ctx) -> Result:
    r = run(PRE + ["--data_path", _truncated(c)], c.out())
    return Result([r], verdict(refused(r, "train-000001.tar") + [before_training(r)]))


@case("T1b", "same as T1a", "PRE W2", "fail: hang")
def t1b(c: Ctx) -> Result:
    r = run(W2(PRE) + ["--data_path", _truncated(c)], c.out(), timeout=120)
    return Result([r], verdict(refused(r, "train-000001.tar") + [before_training(r)]))


def _fifth(c: Ctx, members: Sequence[Member]) -> Path:
    """The shards with a fifth train shard holding ``members``, no train.json (its headers are scanned)."""
    d = copy(c.fx.shards, c.dir / "data")
    write_tar(d / "train-000004.tar", members)
    (d / "train.json").unlink()
    return d


def _dup_key(c: Ctx) -> Path:
    k = sample("k000")
    return _fifth(c, [k[0], k[1], member("k000.png", png_bytes(1))] + sample("m000", 1, 2) + sample("m001", 2, 3))


@case("T4a", "one key twice in a row (k000.png, k000.cls, k000.png) in a fifth shard", "PRE",
      "partial: one bad member ends the run")
def t4a(c: Ctx) -> Result:
    r = run(PRE + ["--data_path", _dup_key(c)], c.out())
    return Result([r], verdict(completed(r, "k000") + [("skipped-samples.txt" in r.disk, "no skipped-samples.txt")]))


@case("T4a-d", "same, --num_workers left at its default", "PRE without --num_workers", "fail: hang")
def t4a_d(c: Ctx) -> Result:
    r = run(flag(PRE, "--num_workers") + ["--data_path", _dup_key(c)], c.out(), timeout=120)
    return Result([r], verdict(completed(r, "k000")))


@case("T6", "symlink member to /etc/passwd; hard links to an in-archive file and to /etc/passwd", "PRE",
      "partial: dropped without a name")
def t6(c: Ctx) -> Result:
    links = []
    for name, kind, target in (("s000.png", tarfile.SYMTYPE, "/etc/passwd"), ("h000.png", tarfile.LNKTYPE, "m000.png"),
                               ("h001.png", tarfile.LNKTYPE, "/etc/passwd")):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        links.append((info, b""))
    d = _fifth(c, sample("m000", 0, 4) + links + [member("s000.cls", b"0"), member("h000.cls", b"0"),
                                                    member("h001.cls", b"0")])
    r = run(PRE + ["--data_path", d], c.out())
    return Result([r], verdict(completed(r, "s000", "h000", "h001")))


@case("T7a", "a 1 GiB member (really present; a sparse file) in a fifth shard", "PRE",
      "fail: no member size limit, ~2x the member per worker")
def t7a(c: Ctx) -> Result:
    d = copy(c.fx.shards, c.dir / "data")
    sparse_member_tar(d / "train-000004.tar", "h000.png", GB, [member("h000.cls", b"0")] + sample("m000", 1, 5))
    (d / "train.json").unlink()
    base = run(PRE + ["--data_path", c.fx.shards], c.out("baseline"))
    r = run(PRE + ["--data_path", d], c.out())
    return Result([base, r], verdict(completed(r, "h000") + [
        (r.peak_mb < base.peak_mb + 300, f"peak RSS {r.peak_mb:.0f} MB against {base.peak_mb:.0f} MB without it")]),
        note=f"peak RSS {r.peak_mb:.0f} MB (without the member: {base.peak_mb:.0f} MB)")


@case("T8a", "train.json says 9 samples for a 5-sample shard", "PRE", "partial: named mid-epoch (hang with workers)")
def t8a(c: Ctx) -> Result:
    d = copy(c.fx.shards, c.dir / "data")
    edit_index(d, "train", lambda ix: ix["shardlist"][1].update(nsamples=9))
    r = run(PRE + ["--data_path", d], c.out())
    rw = run(W2(PRE) + ["--data_path", d], c.out("out_w2"), timeout=120)
    checks = clean(r) + clean(rw) + [(r.has("train-000001.tar"), "the shard is not named"),
                                     (rw.has("train-000001.tar"), "the shard is not named (W2)")]
    return Result([r, rw], verdict(checks), note="also run with W2")


@case("T8b", "train.json says 2 samples for every shard (5, 5, 5, 3 real)", "PRE",
      "fail: silent, 10 of 18 images never used")
def t8b(c: Ctx) -> Result:
    d = copy(c.fx.shards, c.dir / "data")
    edit_index(d, "train", lambda ix: [s.update(nsamples=2) for s in ix["shardlist"]])
    r = run(PRE + ["--data_path", d], c.out())
    return Result([r], verdict(refused(r, "index says")))


@case("T8c", "train.json nsamples = 10^10 for one shard", "PRE (4 GB cap)", "fail: memory exhaustion")
def t8c(c: Ctx) -> Result:
    d = copy(c.fx.shards, c.dir / "data")
    edit_index(d, "train", lambda ix: ix["shardlist"][1].update(nsamples=10 ** 10))
    r = run(PRE + ["--data_path", d], c.out(), cap=4 * GB)
    return Result([r], verdict(refused(r, "10,000,000,000", "train-000001.tar") + [before_training(r)]))


def _two_class_index(c: Ctx) -> Path:
    d = copy(c.fx.shards, c.dir / "data")
    for split in ("train", "val"):
        edit_index(d, split, lambda ix: ix.update(classes=ix["classes"][:2]))
    return d


@case("T8d", "train.json / val.json list 2 classes, the shards hold cls 0-2", "FT",
      "fail: traceback naming no sample or file")
def t8d(c: Ctx) -> Result:
    r = run(FT + ["--data_path", _two_class_index(c)], c.out())
    ok = clean(r) + [(r.has(".tar"), "no shard named"), (r.has("class") or r.has("cls"), "the class is not named")]
    return Result([r], verdict(ok))


@case("T8f", "train.json nsamples = -3 for one shard", "PRE", "fail: silent, the shard never read")
def t8f(c: Ctx) -> Result:
    d = copy(c.fx.shards, c.dir / "data")
    edit_index(d, "train", lambda ix: ix["shardlist"][0].update(nsamples=-3))
    r = run(PRE + ["--data_path", d], c.out())
    return Result([r], verdict(refused(r, "train-000000.tar") + [before_training(r)]))


@case("T9", "SIGTERM at epoch 0 step 40 of 100 (shards200); then a shard added, one replaced by another's "
            "bytes, index rewritten (make_shards.py --reindex); rerun", "PRE --epochs 2 --print_freq 1, rerun",
      "fail: the changed data not noticed")
def t9(c: Ctx) -> Result:
    d = copy(c.fx.shards200, c.dir / "data")
    cmd = flag(flag(PRE, "--epochs", "2"), "--print_freq", "1") + ["--data_path", d]
    a = run(cmd, c.out(), actions=[(line(r"^Epoch \[0\] \[40/100\]"), 0, group(signal.SIGTERM))])
    shutil.copyfile(d / "train-000000.tar", d / "train-000010.tar")
    shutil.copyfile(d / "train-000002.tar", d / "train-000001.tar")
    reindex = run(["tools/make_shards.py", "--reindex", "--output_dir", d])
    b = run(cmd, c.out())
    checks = [(a.rc == 0 and a.has("checkpoint written at epoch 0"), "the stop did not checkpoint mid-epoch"),
              (reindex.rc == 0, "--reindex failed")] + refused(b, "train-000010.tar")
    return Result([a, reindex, b], verdict(checks))


def _many_pngs(c: Ctx, n: int, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image
    src = c.dir / "pngs"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(src / f"p{i:04d}.png")
    return src


def _tree_bytes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(folder.iterdir()) if p.name.startswith("train") and p.is_file()}


@case("T11", "kill -9 of make_shards.py (400 64-px PNGs, --shard_size 20) once 3 shards are written; "
             "PRE on the partial folder; the same command again; then with --resume",
      "tools/make_shards.py; PRE", "partial: nothing resumes; the partial folder trains with a note")
def t11(c: Ctx) -> Result:
    src = _many_pngs(c, 400)
    part, whole = c.dir / "partial", c.dir / "whole"
    conv = ["tools/make_shards.py", "--data_path", src, "--shard_size", "20", "--splits", "train"]
    ref = run(conv + ["--output_dir", whole])
    killed = run(conv + ["--output_dir", part],
                 actions=[(lambda _: (part / "train-000002.tar").exists(), 0, group(signal.SIGKILL))])
    shards_left = len(list(part.glob("train-*.tar")))
    pre = run(PRE + ["--data_path", part], c.out())
    again = run(conv + ["--output_dir", part])
    resumed = run(conv + ["--output_dir", part, "--resume"])
    same = _tree_bytes(part) == _tree_bytes(whole)
    checks = [(killed.rc == -9 and shards_left < 20, f"the conversion was not killed midway ({shards_left} shards)")]
    checks += refused(pre, str(part)) + refused(again, "--resume")
    checks += clean(resumed) + [(resumed.rc == 0, f"--resume: status {resumed.rc}"),
                                (same, "the resumed shards differ from an uninterrupted conversion's")]
    return Result([ref, killed, pre, again, resumed], verdict(checks),
                  note=f"killed with {shards_left} shards on disk; resumed bytes equal: {same}")


@case("T13", "--data_path is itself a shard folder", "tools/make_shards.py", "fail: traceback")
def t13(c: Ctx) -> Result:
    r = run(["tools/make_shards.py", "--data_path", c.fx.shards, "--output_dir", c.out()])
    return Result([r], verdict(refused(r, "shard")))


def _bad_cls(c: Ctx) -> Path:
    d = copy(c.fx.shards, c.dir / "data")
    members = read_tar(d / "train-000001.tar")
    first = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".cls"))
    members = [(m, b"7" if i == first else data) for i, (m, data) in enumerate(members)]
    write_tar(d / "train-000001.tar", members)
    refresh_sizes(d)
    return d


@case("T14", "one cls entry = 7 (3 classes), index present", "FT", "fail: traceback naming neither sample nor shard")
def t14(c: Ctx) -> Result:
    r = run(FT + ["--data_path", _bad_cls(c)], c.out())
    return Result([r], verdict(completed(r, "train-000001.tar")))


@case("T14-w", "same as T14", "FT W2", "fail: hang")
def t14w(c: Ctx) -> Result:
    r = run(W2(FT) + ["--data_path", _bad_cls(c)], c.out(), timeout=120)
    return Result([r], verdict(completed(r, "train-000001.tar")))


@case("T15", "--batch_size 1; a 0-byte z000.png member in a fifth shard", "PRE --batch_size 1",
      "fail: an all-bad batch ends the run")
def t15(c: Ctx) -> Result:
    d = _fifth(c, [member("z000.png", b""), member("z000.cls", b"0")] + sample("m000", 1, 6))
    r = run(flag(PRE, "--batch_size", "1") + ["--data_path", d], c.out())
    return Result([r], verdict(completed(r, "z000")))


@case("T16", "--data_path .../train-{000000..999999999}.tar (three digits too many)", "PRE (4 GB cap)",
      "fail: memory exhaustion before any check")
def t16(c: Ctx) -> Result:
    r = run(PRE + ["--data_path", f"{c.fx.shards}/train-{{000000..999999999}}.tar"], c.out(), cap=4 * GB, timeout=120)
    return Result([r], verdict(refused(r, "1,000,000") + [(r.seconds < 30, f"{r.seconds} s")]))


def _decodes(folder: Path) -> tuple[int, int, int]:
    """(samples, undecodable images, samples the index counts) of the train shards of ``folder``."""
    import io
    from PIL import Image
    n = bad = 0
    for t in sorted(folder.glob("train-*.tar")):
        for m, data in read_tar(t):
            if m.name.endswith((".png", ".jpg")):
                n += 1
                try:
                    Image.open(io.BytesIO(data)).load()
                except Exception:
                    bad += 1
    indexed = sum(s["nsamples"] for s in load_json(folder / "train.json")["shardlist"]) \
        if (folder / "train.json").exists() else -1
    return n, bad, indexed


@case("T17", "two make_shards.py (seeds 0 and 1) into one empty --output_dir, started together; 2,000 images "
             "(symlinks to 200 PNGs; 20,000 before), --shard_size 100", "tools/make_shards.py x2",
      "fail: silent corruption (30 undecodable images)")
def t17(c: Ctx) -> Result:
    src = _many_pngs(c, 200)
    many = c.dir / "many"
    many.mkdir()
    for i in range(2000):
        (many / f"l{i:05d}.png").symlink_to(src / f"p{i % 200:04d}.png")
    out = c.out()
    out.mkdir()
    conv = ["tools/make_shards.py", "--data_path", many, "--shard_size", "100", "--splits", "train", "--output_dir", out]
    procs, logs = [], []
    t0 = time.monotonic()
    for seed in ("0", "1"):
        log = tempfile.TemporaryFile("w+")
        procs.append(subprocess.Popen([PY, *map(str, conv), "--seed", seed], stdout=log, stderr=subprocess.STDOUT,
                                      text=True, cwd=ROOT, start_new_session=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
        logs.append(log)
    runs = []
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = None
            p.wait()
        log.seek(0)
        runs.append(Run([*map(str, conv)], rc, round(time.monotonic() - t0, 1), log.read(), [], 0, out, listing(out)))
        runs[-1].holds = disk_summary(runs[-1])
        log.close()
    n, bad, indexed = _decodes(out)
    winners = [r for r in runs if r.rc == 0]
    losers = [r for r in runs if r.rc != 0]
    checks = [(len(winners) == 1, f"{len(winners)} conversions report success")]
    checks += refused(losers[0], "in use") if losers else []
    checks += [(bad == 0, f"{bad} undecodable images"), (n == 2000 and indexed == 2000, f"{n} samples, index {indexed}")]
    return Result(runs, verdict(checks), note=f"{n} samples, {bad} undecodable, index counts {indexed}")


# --- 2. decoding

@case("D12", "a real 14,000 x 14,000 grey JPEG (196 Mpx, over twice PIL's pixel limit; 20,000^2 before) "
             "among 8 photos, one shard", "PRE --decode pil / fast", "partial: fast trained on it, PIL skipped it")
def d12(c: Ctx) -> Result:
    from PIL import Image, ImageDraw
    imgs = c.dir / "imgs"
    imgs.mkdir()
    for i, p in enumerate(sorted((c.fx.labelled / "train" / "class_0").iterdir())):
        Image.open(p).convert("RGB").save(imgs / f"n{i}.jpg")
    Image.MAX_IMAGE_PIXELS = None
    big = Image.new("L", (14000, 14000), 90)
    ImageDraw.Draw(big).ellipse((2000, 2000, 12000, 12000), fill=200)
    big.save(imgs / "bomb.jpg", quality=80)
    del big
    shards = c.dir / "shards"
    mk = run(["tools/make_shards.py", "--data_path", imgs, "--output_dir", shards, "--splits", "train"])
    a = run(flag(PRE, "--decode", "pil") + ["--data_path", shards], c.out("pil"))
    b = run(flag(PRE, "--decode", "fast") + ["--data_path", shards], c.out("fast"))
    checks = [(mk.rc == 0, f"make_shards status {mk.rc}")] + completed(a, "bomb") + completed(b, "bomb")
    return Result([mk, a, b], verdict(checks))


# --- 3. detection data

def _coco_variant(c: Ctx, src: Optional[Path] = None) -> Path:
    return copy(src or c.fx.coco, c.dir / "data")


def _ann(d: Path, split: str = "train") -> Path:
    return d / "annotations" / f"instances_{split}2017.json"


def _edit_coco(d: Path, split: str, edit: Callable[[dict], object]) -> None:
    """Edit the annotation file in place (``edit`` changes its argument; what it returns is ignored)."""
    p = _ann(d, split)
    data = load_json(p)
    edit(data)
    save_json(p, data)


def _det(c: Ctx, d: Path, extra: Sequence[str] = (), base: Sequence[str] = DET, timeout: float = 180,
         cap: int = 6 * GB) -> Run:
    return run(list(base) + list(extra) + ["--data_path", d], c.out(), timeout=timeout, cap=cap)


@case("C1a", "train JSON is []", "DET", "fail: traceback")
def c1a(c: Ctx) -> Result:
    d = _coco_variant(c)
    save_json(_ann(d, "train"), [])
    r = _det(c, d)
    return Result([r], verdict(refused(r, "instances_train2017.json")))


@case("C1d", "no 'images' key", "DET", "partial: 'no training image has a usable box' (misleading)")
def c1d(c: Ctx) -> Result:
    d = _coco_variant(c)
    _edit_coco(d, "train", lambda a: a.pop("images"))
    r = _det(c, d)
    return Result([r], verdict(refused(r, "images") + [(not r.has("usable box"), "still the misleading message")]))


@case("C1h", "image width \"64\" (a string)", "DET", "fail: traceback")
def c1h(c: Ctx) -> Result:
    d = _coco_variant(c)
    _edit_coco(d, "train", lambda a: a["images"][0].update(width=str(a["images"][0]["width"])))
    r = _det(c, d)
    return Result([r], verdict(refused(r, "width")))


@case("C5", "an annotation whose image_id (12345) is in no image (train and val)", "DET", "partial: ignored silently")
def c5(c: Ctx) -> Result:
    d = _coco_variant(c)
    for split in ("train", "val"):
        _edit_coco(d, split, lambda a: a["annotations"].append(
            dict(a["annotations"][0], id=99999, image_id=12345)))
    r = _det(c, d)
    return Result([r], verdict(clean(r) + [(r.has("12345"), "the orphan is not named")]))


def _replace_image(d: Path, split: str, index: int, write: Callable[[Path], None]) -> str:
    name = load_json(_ann(d, split))["images"][index]["file_name"]
    write(d / f"{split}2017" / name)
    return name


@case("C7b", "one train image replaced by a 20,000 x 20,000 PNG (JSON sizes to match)", "DET",
      "fail: one image ends the run")
def c7b(c: Ctx) -> Result:
    from PIL import Image
    d = _coco_variant(c)
    Image.MAX_IMAGE_PIXELS = None
    name = _replace_image(d, "train", 1, lambda p: Image.new("1", (20000, 20000)).save(p))
    _edit_coco(d, "train", lambda a: a["images"][1].update(width=20000, height=20000))
    r = _det(c, d)
    return Result([r], verdict(completed(r, name)))


@case("C8", "one train image listed but deleted", "DET", "fail: one image ends the run")
def c8(c: Ctx) -> Result:
    d = _coco_variant(c)
    name = _replace_image(d, "train", 1, lambda p: p.unlink())
    r = _det(c, d)
    return Result([r], verdict(completed(r, name)))


@case("C8-w", "same as C8", "DET W2", "fail: hang")
def c8w(c: Ctx) -> Result:
    d = _coco_variant(c)
    name = _replace_image(d, "train", 1, lambda p: p.unlink())
    r = _det(c, d, base=W2(DET), timeout=120)
    return Result([r], verdict(completed(r, name)))


@case("C8b", "one val image deleted", "DET", "fail: the trained epoch lost")
def c8b(c: Ctx) -> Result:
    d = _coco_variant(c)
    name = _replace_image(d, "val", 0, lambda p: p.unlink())
    r = _det(c, d)
    return Result([r], verdict(completed(r, name) + [("checkpoint-last.pth" in r.disk, "no checkpoint")]))


@case("C8c", "one train PNG replaced by text", "DET", "fail: one image ends the run")
def c8c(c: Ctx) -> Result:
    d = _coco_variant(c)
    name = _replace_image(d, "train", 1, lambda p: p.write_text("not an image\n"))
    r = _det(c, d)
    return Result([r], verdict(completed(r, name)))


@case("C9b", "every image file resized to half on disk, JSON unchanged", "DET",
      "fail: silent wrong metric (perfect predictions AP 0.0)")
def c9b(c: Ctx) -> Result:
    from PIL import Image
    d = _coco_variant(c)
    for p in list((d / "train2017").iterdir()) + list((d / "val2017").iterdir()):
        with Image.open(p) as im:
            small = im.resize((im.width // 2, im.height // 2))
        small.save(p)
    img = load_json(_ann(d, "train"))["images"][0]
    w, h = img["width"], img["height"]
    r = _det(c, d)
    return Result([r], verdict(clean(r) + [(r.has(img["file_name"], f"{w // 2}x{h // 2}", f"{w}x{h}"),
                                            "the size mismatch is not named")]))


def _val_without(c: Ctx, key: str) -> Result:
    d = _coco_variant(c)
    _edit_coco(d, "val", lambda a: [ann.pop(key, None) for ann in a["annotations"]])
    r = _det(c, d, ["--score_thr", "0"])
    ok = r.rc == 0 or before_training(r)[0]
    return Result([r], verdict(clean(r) + [(ok, "failed after training (the epoch's evaluation)"),
                                           (r.rc == 0 or r.has(key), f"'{key}' not named")]))


@case("C11a", "val annotations without 'area'", "DET --score_thr 0", "fail: the trained epoch lost (KeyError)")
def c11a(c: Ctx) -> Result:
    return _val_without(c, "area")


@case("C11b", "val annotations without 'iscrowd'", "DET --score_thr 0", "fail: the trained epoch lost (KeyError)")
def c11b(c: Ctx) -> Result:
    return _val_without(c, "iscrowd")


def _to16(p: Path) -> None:
    import numpy as np
    from PIL import Image
    with Image.open(p) as im:
        grey = np.asarray(im.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(p.with_suffix(".png"))
    if p.suffix != ".png":
        p.unlink()


def _white(img) -> float:
    import numpy as np
    a = np.asarray(img)
    return float((a == 255).mean())


@case("C12", "every image a 16-bit grey PNG", "DET; the training dataset's decoded pixels",
      "fail: silent, decoded white")
def c12(c: Ctx) -> Result:
    d = _coco_variant(c)
    for p in list((d / "train2017").iterdir()) + list((d / "val2017").iterdir()):
        _to16(p)
    r = _det(c, d)
    from detection.coco import CocoDetection
    ds = CocoDetection(d, "train", train=True, input_size=64)
    white = max(_white(ds._load_image(i)) for i in range(len(ds)))
    return Result([r], verdict(completed(r) + [(white < 0.5, f"{white:.0%} of decoded pixels are 255")]),
                  note=f"largest share of 255 pixels in a decoded image: {white:.1%}")


def _many_boxes(d: Path, n: int = 200000) -> None:
    import random
    rng = random.Random(0)

    def edit(a: dict) -> None:
        img = a["images"][0]
        w, h = img["width"], img["height"]
        next_id = max(x["id"] for x in a["annotations"]) + 1
        for k in range(n):
            x, y = rng.randint(0, w - 3), rng.randint(0, h - 3)
            a["annotations"].append(dict(id=next_id + k, image_id=img["id"], category_id=1, iscrowd=0, area=4,
                                         bbox=[x, y, 2, 2], segmentation=[[x, y, x + 2, y, x + 2, y + 2, x, y + 2]]))
    _edit_coco(d, "train", edit)


def _boxes_named(r: Run, d: Path) -> list[tuple[bool, str]]:
    """Finished, the crowded image named with its count (200,000 added to the image's own boxes)."""
    name = load_json(_ann(d, "train"))["images"][0]["file_name"]
    counted = re.search(r"\b200,?00\d\b", r.output) is not None
    return completed(r, name) + [(counted, "the count is not named")]


@case("C14", "200,000 boxes of 2 x 2 px on one train image (a 20 MB JSON)", "DET --input_size 256 (6 GB cap)",
      "fail: memory exhaustion")
def c14(c: Ctx) -> Result:
    d = _coco_variant(c)
    _many_boxes(d)
    r = _det(c, d, ["--input_size", "256"])
    return Result([r], verdict(_boxes_named(r, d)), note=f"peak RSS {r.peak_mb:.0f} MB")


@case("C14m", "same as C14", "DET --detector mask_rcnn", "fail: memory exhaustion")
def c14m(c: Ctx) -> Result:
    d = _coco_variant(c)
    _many_boxes(d)
    r = _det(c, d, ["--input_size", "256", "--detector", "mask_rcnn"])
    return Result([r], verdict(_boxes_named(r, d)), note=f"peak RSS {r.peak_mb:.0f} MB")


def _file_name(c: Ctx, name: str) -> Run:
    d = _coco_variant(c)
    _edit_coco(d, "train", lambda a: a["images"][1].update(file_name=name))
    return _det(c, d, timeout=90)


@case("C15", "file_name is the absolute path of a system file (/etc/passwd)", "DET",
      "fail (low): the path leaves train2017/")
def c15(c: Ctx) -> Result:
    r = _file_name(c, "/etc/passwd")
    return Result([r], verdict(clean(r) + [(r.has("/etc/passwd"), "not named"),
                                           (any(r.has(w) for w in ("outside", "not under", "leaves")),
                                            "not said to leave the image folder")]))


@case("C15b", "file_name ../../../../../../etc/passwd", "DET", "fail (low): the path leaves train2017/")
def c15b(c: Ctx) -> Result:
    r = _file_name(c, "../../../../../../etc/passwd")
    return Result([r], verdict(clean(r) + [(r.has("etc/passwd"), "not named"),
                                           (any(r.has(w) for w in ("outside", "not under", "leaves")),
                                            "not said to leave the image folder")]))


@case("C15c", "file_name is a FIFO in train2017/", "DET", "fail: hang")
def c15c(c: Ctx) -> Result:
    d = _coco_variant(c)
    os.mkfifo(d / "train2017" / "fifo.png")
    _edit_coco(d, "train", lambda a: a["images"][1].update(file_name="fifo.png"))
    r = _det(c, d, timeout=60)
    return Result([r], verdict(clean(r) + [(r.has("fifo.png"), "not named")]))


def _twice(r: Run) -> tuple[bool, str]:
    return (any(r.has(w) for w in ("duplicate", "more than once", "unique")), "the repeated id is not named")


@case("C16", "coco40, every val annotation id 1", "DET", "fail: silent wrong metric (AP 0.001)")
def c16(c: Ctx) -> Result:
    d = _coco_variant(c, c.fx.coco40)
    _edit_coco(d, "val", lambda a: [ann.update(id=1) for ann in a["annotations"]])
    r = _det(c, d)
    return Result([r], verdict(refused(r, "instances_val2017.json") + [before_training(r), _twice(r)]))


@case("C17", "coco40, two val images share an id", "DET", "fail: silent, a file paired with another's boxes")
def c17(c: Ctx) -> Result:
    d = _coco_variant(c, c.fx.coco40)
    _edit_coco(d, "val", lambda a: a["images"][1].update(id=a["images"][0]["id"]))
    r = _det(c, d)
    return Result([r], verdict(refused(r, "instances_val2017.json") + [before_training(r), _twice(r)]))


@case("C18", "coco40, --batch_size 3 (the last val batch holds 1 image)", "DET --batch_size 3",
      "fail (low): GFL GroupNorm error after the epoch trained")
def c18(c: Ctx) -> Result:
    r = _det(c, c.fx.coco40, ["--batch_size", "3"])
    return Result([r], verdict(completed(r)))


# --- 4. segmentation data

def _ade_variant(c: Ctx, src: Optional[Path] = None) -> Path:
    return copy(src or c.fx.ade, c.dir / "data")


def _labels(d: Path, split: str) -> list[Path]:
    return sorted((d / "annotations" / split).glob("*.png"))


def _patch_label(p: Path, value: int, size: int, dtype: str = "uint8") -> None:
    import numpy as np
    from PIL import Image
    with Image.open(p) as im:
        a = np.asarray(im).astype(dtype)
    a[4:4 + size, 4:4 + size] = value
    Image.fromarray(a).save(p)


def _seg(c: Ctx, d: Path, base: Sequence[str] = SEG, extra: Sequence[str] = ()) -> Run:
    return run(list(base) + list(extra) + ["--data_path", d], c.out())


@case("G2", "a train label with a 10 x 10 patch of value 10 (4 classes)", "SEG", "fail: traceback naming no file")
def g2(c: Ctx) -> Result:
    d = _ade_variant(c)
    p = _labels(d, "training")[1]
    _patch_label(p, 10, 10)
    r = _seg(c, d)
    return Result([r], verdict(completed(r, p.name)))


@case("G2b", "same in a val label", "SEG", "fail: no file named, the chunk lost")
def g2b(c: Ctx) -> Result:
    d = _ade_variant(c)
    p = _labels(d, "validation")[1]
    _patch_label(p, 10, 10)
    r = _seg(c, d)
    ok = r.rc == 0 or before_training(r)[0]
    return Result([r], verdict(clean(r) + [(r.has(p.name), f"{p.name} not named"),
                                           (ok, "failed after the chunk trained")]))


@case("G3b", "every train label saved as RGB", "SEG", "partial: clear, but mid-run and a traceback")
def g3b(c: Ctx) -> Result:
    from PIL import Image
    d = _ade_variant(c)
    for p in _labels(d, "training"):
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        rgb.save(p)
    r = _seg(c, d)
    return Result([r], verdict(refused(r, "label")))


@case("G5b", "a 16-bit train label with a 4 x 4 patch of 65535", "SEG", "fail: traceback naming no file")
def g5b(c: Ctx) -> Result:
    d = _ade_variant(c)
    p = _labels(d, "training")[1]
    _patch_label(p, 65535, 4, "uint16")
    r = _seg(c, d)
    return Result([r], verdict(completed(r, p.name)))


@case("G5c", "every image a 16-bit grey PNG", "SEG; the loader's decoded pixels", "fail: silent, decoded white")
def g5c(c: Ctx) -> Result:
    d = _ade_variant(c)
    for split in ("training", "validation"):
        for p in sorted((d / "images" / split).iterdir()):
            _to16(p)
    r = _seg(c, d)
    from segmentation.data import load_pair
    imgs = sorted((d / "images" / "training").glob("*.png"))
    white = max(_white(load_pair(str(p), str(d / "annotations" / "training" / p.name), True)[0]) for p in imgs)
    return Result([r], verdict(completed(r) + [(white < 0.5, f"{white:.0%} of decoded pixels are 255")]),
                  note=f"largest share of 255 pixels in a decoded image: {white:.1%}")


# --- 5. process faults on the dense programs

def _interrupted(c: Ctx, cmd: list[str], trigger: str, term_after: float, kill_after: float,
                 retrained: str) -> Result:
    """An uninterrupted run; the same run given SIGTERM ``term_after`` s after ``trigger`` and SIGKILL
    ``kill_after`` s later; its rerun. Pass: the rerun ends with the uninterrupted weights and does not
    train again the period whose progress lines match ``retrained``."""
    ref = run(cmd, c.out("uninterrupted"), timeout=400)
    a = run(cmd, c.out(), timeout=400, actions=[(line(trigger), term_after, group(signal.SIGTERM)),
                                                (lambda _: True, kill_after, group(signal.SIGKILL))])
    b = run(cmd, c.out(), timeout=400)
    same = (ref.rc == 0 and b.rc == 0 and
            weights_digest(c.out("uninterrupted") / "checkpoint-last.pth") == weights_digest(c.out() / "checkpoint-last.pth"))
    checks = [(ref.rc == 0, f"uninterrupted run: status {ref.rc}"), (a.rc == -9, f"not killed during evaluation ({a.rc})")]
    checks += completed(b) + [(same, "final weights differ from the uninterrupted run's"),
                              (not re.search(retrained, b.output, re.M), "the interrupted period was trained again")]
    return Result([ref, a, b], verdict(checks), note=f"final weights {'exact' if same else 'NOT exact'}")


@case("P2b", "SIGTERM 0.3 s into the evaluation of epoch 1 (--test_size 512 512), SIGKILL 1 s later; rerun",
      "DET coco40 --epochs 3 --print_freq 1, rerun", "partial: epoch 1's training lost")
def p2b(c: Ctx) -> Result:
    cmd = flag(flag(flag(DET, "--epochs", "3"), "--print_freq", "1"), "--test_size", "512", "512")
    return _interrupted(c, cmd + ["--data_path", c.fx.coco40], r"^Epoch \[1\] \[20/20\]", 0.3, 1.0, r"^Epoch \[1\] \[")


@case("P3b", "SIGTERM 0.3 s into the evaluation after chunk 1 (--img_scale 384 256 --test_stride 32), "
             "SIGKILL 1.5 s later; rerun", "SEG ade 20+20 (20+60 before) --iters 30 --eval_interval 10, rerun",
      "partial: chunk 1 lost")
def p3b(c: Ctx) -> Result:
    cmd = flag(flag(flag(flag(flag(SEG, "--iters", "30"), "--eval_interval", "10"), "--print_freq", "1"),
                    "--img_scale", "384", "256"), "--test_stride", "32")
    return _interrupted(c, cmd + ["--data_path", c.fx.ade20], r"^Iter \[10-20\] \[10/10\]", 0.3, 1.5,
                        r"^Iter \[10-20\]")


def _two_runs(c: Ctx, second: list[str]) -> Result:
    cmd = flag(DET, "--epochs", "3") + ["--data_path", c.fx.coco40]
    out = c.out()
    procs = []
    t0 = time.monotonic()
    for extra in ([], second):
        log = tempfile.TemporaryFile("w+")
        procs.append((subprocess.Popen([PY, *map(str, cmd + extra), "--output_dir", str(out)], stdout=log,
                                       stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True,
                                       env=dict(os.environ, OMP_NUM_THREADS="1")), log))
        time.sleep(1.0)
    runs = []
    for p, log in procs:
        try:
            rc = p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = None
            p.wait()
        log.seek(0)
        runs.append(Run([*map(str, cmd)], rc, round(time.monotonic() - t0, 1), log.read(), [], 0, out, listing(out)))
        runs[-1].holds = disk_summary(runs[-1])
        log.close()
    epochs = [json.loads(ln).get("epoch") for ln in (out / "log.txt").read_text().splitlines()] \
        if (out / "log.txt").exists() else []
    records = [n for n in listing(out) if re.fullmatch(r"run-\d+\.json", n)]
    checks = clean(runs[0]) + [(runs[0].rc == 0, f"first run: status {runs[0].rc}")] + refused(runs[1], "in use")
    checks += [(epochs == [0, 1, 2], f"log.txt epochs {epochs}"), (len(records) == 1, f"{len(records)} run records")]
    return Result(runs, verdict(checks), note=f"log.txt epochs {epochs}; run records {records}")


@case("P5", "two identical runs on one --output_dir, the second started 1 s after the first (coco40, 3 epochs)",
      "DET x2", "fail: both 'completed', interleaved log")
def p5(c: Ctx) -> Result:
    return _two_runs(c, [])


@case("P5b", "same, the second with --seed 1", "DET x2", "fail: silent mix of the two runs' checkpoints")
def p5b(c: Ctx) -> Result:
    return _two_runs(c, ["--seed", "1"])


PROBE = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from engine.run import lock_output_dir
from engine.checkpoint import remove_stale_temps
from errors import UsageError
refused = removed = taken = early = 0
while os.path.exists("/proc/{pid}"):  # until the run is gone (reaped by the driver)
    try:
        lock = lock_output_dir({out!r}, "probe")
    except (UsageError, SystemExit):
        refused += 1
    else:
        taken += 1
        try:  # the run writes its record's end before it gives the folder up
            early += "finished" not in json.load(open({out!r} + "/run-001.json"))
        except (OSError, ValueError):
            early += 1
        removed += len(remove_stale_temps({out!r}))
        if lock is not None:
            lock.release()
    time.sleep(0.001)
print(f"probe: refused {{refused}}, took the folder {{taken}} ({{early}} before the run ended), "
      f"removed {{removed}} temp file(s)")
"""


@case("P6", "while a run trains, a loop repeats a program start's first steps on its folder every 1 ms "
            "(lock, then remove stale checkpoint temps)", "DET coco40 --epochs 3",
      "fail: a second start deletes the run's checkpoint being written")
def p6(c: Ctx) -> Result:
    out = c.out()
    cmd = flag(DET, "--epochs", "3") + ["--data_path", c.fx.coco40]
    probe: list[subprocess.Popen] = []

    def start_probe(proc: subprocess.Popen) -> None:
        probe.append(subprocess.Popen([PY, "-c", PROBE.format(root=str(ROOT), out=str(out), pid=proc.pid)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT))

    r = run(cmd, out, actions=[(line(r"^Epoch \[0\]"), 0, start_probe)])
    said = probe[0].communicate(timeout=60)[0].strip().splitlines()[-1] if probe else "probe not started"
    r.disk = listing(out)  # once the probe is gone (its own write check is a temporary file)
    r.holds = disk_summary(r)
    m = re.search(r"refused (\d+), took the folder (\d+) \((\d+) before the run ended\)", said)
    during = m is None or m.group(3) != "0"
    epochs = [json.loads(ln).get("epoch") for ln in (out / "log.txt").read_text().splitlines()] \
        if (out / "log.txt").exists() else []
    checks = completed(r) + [(m is not None and int(m.group(1)) > 0, f"the probe did not run: {said}"),
                             (not during, "the probe took the folder while the run held it"),
                             (epochs == [0, 1, 2], f"log.txt epochs {epochs}"),
                             (all(f in r.disk for f in ("checkpoint-last.pth", "checkpoint-2.pth")), "checkpoints missing")]
    return Result([r], verdict(checks), note=said)


@case("P7-w", "--output_dir on a 20 MB tmpfs (a checkpoint is ~9 MB)", "DET W2 --epochs 4", "fail: hang")
def p7w(c: Ctx) -> Result:
    with tmpfs(c.dir / "mnt", "20m") as mnt:
        r = run(flag(W2(DET), "--epochs", "4") + ["--data_path", c.fx.coco], mnt / "out", timeout=120)
        return Result([r], verdict(clean(r) + [(r.rc not in (0, None), f"status {r.rc}"),
                                               (r.has("No space left"), "the full disk is not named")]))


@case("P7-pre", "pretraining on an image folder (200 JPEGs) with --output_dir on a 20 MB tmpfs, --save_freq 1",
      "PRE W2 --batch_size 8 --epochs 40", "fail: hang")
def p7pre(c: Ctx) -> Result:
    with tmpfs(c.dir / "mnt", "20m") as mnt:
        cmd = flag(flag(flag(W2(PRE), "--batch_size", "8"), "--epochs", "40"), "--save_freq", "1")
        r = run(cmd + ["--data_path", c.fx.images200], mnt / "out", timeout=150)
        return Result([r], verdict(clean(r) + [(r.rc not in (0, None), f"status {r.rc}"),
                                               (r.has("No space left"), "the full disk is not named")]))


@case("P8", "--log_dir on a full 64 KB tmpfs (8 KB free before: today's events stay under 8 KB)",
      "DET coco40 --epochs 3 --log_dir <tmpfs>",
      "fail: a full TensorBoard folder ends the training")
def p8(c: Ctx) -> Result:
    with tmpfs(c.dir / "mnt", "64k", fill=-1) as mnt:
        r = run(flag(flag(DET, "--epochs", "3"), "--log_dir", str(mnt / "tb")) + ["--data_path", c.fx.coco40], c.out())
        return Result([r], verdict(completed(r, "tensorboard")))


@case("P9", "--output_dir on a 1 MB tmpfs that is already full", "DET", "partial: a traceback, an empty run record")
def p9(c: Ctx) -> Result:
    with tmpfs(c.dir / "mnt", "1m", fill=-1) as mnt:
        out = mnt / "out"
        r = run(DET + ["--data_path", c.fx.coco], out, timeout=120)
        records = [n for n in r.disk if n.startswith("run-")]
        return Result([r], verdict(refused(r, "No space left") + [before_training(r),
                                                                  (not records, f"left {records}")]))


# --- 6. run records, paths, tools

@case("S3", "--output_dir of 4,068 characters (17 levels; PATH_MAX 4096)", "DET",
      "fail (low): the epoch trained, then lost (name too long)")
def s3(c: Ctx) -> Result:
    base = str(c.dir)
    per = (4068 - len(base)) // 17 - 1
    parts = ["d" * per] * 16
    parts.append("e" * (4068 - len(base) - 17 - per * 16))
    out = Path(base, *parts)
    assert len(str(out)) == 4068
    r = run(DET + ["--data_path", c.fx.coco], out, timeout=120)
    return Result([r], verdict(refused(r, "too long") + [before_training(r)]))


def _ramp_pair(c: Ctx) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image
    folder = c.dir / "imgs"
    folder.mkdir()
    ramp = np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (128, 1))
    Image.fromarray(ramp).save(folder / "ramp16.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(folder / "ramp8.png")
    return folder / "ramp16.png", folder / "ramp8.png"


@case("R1", "a 16-bit grey PNG beside its 8-bit twin", "tools/reconstruct.py; its loader's tensors",
      "fail (low): the 16-bit input decoded white")
def r1(c: Ctx) -> Result:
    p16, p8 = _ramp_pair(c)
    r = run(["tools/reconstruct.py", "--checkpoint", c.fx.pretrain_checkpoint, "--images", p16, p8,
             "--output", c.dir / "fig.png"])
    from tools.reconstruct import load_images
    a, b = load_images([p16, p8], 128)
    diff = float((a - b).abs().max())
    return Result([r], verdict(clean(r) + [(r.rc == 0, f"status {r.rc}"), (diff < 0.05, f"16-bit and 8-bit twins "
                                                                                        f"differ by {diff:.3f}")]),
                  note=f"largest difference between the twins' input tensors: {diff:.4f}")


@case("R3", "--output where it cannot be written (/proc/r3.png)", "tools/reconstruct.py", "fail (message, low)")
def r3(c: Ctx) -> Result:
    p16, p8 = _ramp_pair(c)
    r = run(["tools/reconstruct.py", "--checkpoint", c.fx.pretrain_checkpoint, "--images", p8,
             "--output", "/proc/r3.png"])
    return Result([r], verdict(refused(r, "/proc/r3.png")))


@case("R6", "--max_images 0", "tools/reconstruct.py", "partial: 'none of the --images could be read' (misleading)")
def r6(c: Ctx) -> Result:
    p16, p8 = _ramp_pair(c)
    r = run(["tools/reconstruct.py", "--checkpoint", c.fx.pretrain_checkpoint, "--images", p8,
             "--max_images", "0", "--output", c.dir / "fig.png"])
    return Result([r], verdict(refused(r, "--max_images")))


@case("E2", "--output is an existing file", "tools/export_backbone.py", "fail (message, low)")
def e2(c: Ctx) -> Result:
    p16, p8 = _ramp_pair(c)
    r = run(["tools/export_backbone.py", "--checkpoint", c.fx.pretrain_checkpoint, "--model", "swin_pico_128",
             "--output", p8])
    return Result([r], verdict(refused(r, p8.name)))


@case("E5", "--input_size 100 for Swin", "tools/export_backbone.py", "fail (message, low)")
def e5(c: Ctx) -> Result:
    r = run(["tools/export_backbone.py", "--checkpoint", c.fx.pretrain_checkpoint, "--model", "swin_pico_128",
             "--output", c.out(), "--input_size", "100"])
    return Result([r], verdict(refused(r, "100")))


# ----------------------------------------------------------------------------------------------- report

def short(text: str, work: Path, n: int = 150) -> str:
    text = text.replace(str(work), "…").replace(str(ROOT) + "/", "").replace("|", "\\|")
    return text if len(text) <= n else text[:n - 1] + "…"


def row(cs: Case, res: dict) -> str:
    last = res["runs"][-1] if res["runs"] else {}
    rcs = ", ".join("killed" if r["rc"] is None else str(r["rc"]) for r in res["runs"])
    secs = ", ".join(f"{r['seconds']:.0f}" for r in res["runs"])
    after = res["verdict"] + (f" ({res['note']})" if res.get("note") else "")
    return (f"| {cs.id} | {cs.setup.replace('|', '/')} | {cs.command} | {cs.before} | {rcs} | {secs} | "
            f"{last.get('message', '')} | {last.get('disk', '')} | {after.replace('|', '/')} |")


def table(results: dict) -> str:
    head = ("| # | Setup | Command | Before | rc | s | Message (first line, last run) | Output folder (last run) "
            "| After |\n|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [row(cs, results[cs.id]) for cs in CASES if cs.id in results])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


def write_markdown(path: Path, meta: dict, results: dict) -> str:
    counts = meta["counts"]
    reruns = "".join(f" Re-run on {r['date']}: {' '.join(r['cases'])} ({r['wall_s']} s)." for r in meta.get("reruns", []))
    md = table(results)
    path.write_text(
        f"# Fault re-run\n\nGenerated by `{meta['command']}` on {meta['machine']} (shared with other work), "
        f"{meta['date']}; wall time {meta['wall_s']} s.{reruns} {counts['pass']} pass, {counts['fail']} fail"
        f"{', ' + str(counts['error']) + ' driver errors' if counts['error'] else ''} of {len(results)} cases. "
        f"Shorthands: PRE = `{shlex.join(PRE)} --data_path <fixture>`; FT = `{shlex.join(FT)}`; DET = `{shlex.join(DET)}`; "
        f"SEG = `{shlex.join(SEG)}`; W2 = the same with `--num_workers 2`; each run gets its own `--output_dir`. "
        f"rc -9: killed by the case (SIGKILL); s: wall seconds of each run, start-up included.\n\n" + md + "\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", help="case ids (default: all); their rows replace those in the JSON")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "faults_rerun"), help="JSON / markdown path stem")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown from the JSON (no run)")
    args = ap.parse_args()
    if args.table:
        stored = load_json(Path(args.out + ".json"))
        write_markdown(Path(args.out + ".md"), stored, stored["cases"])
        return
    known = {cs.id: cs for cs in CASES}
    chosen = args.cases or list(known)
    unknown = [x for x in chosen if x not in known]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="fault_rerun_"))
    work.mkdir(parents=True, exist_ok=True)
    json_path, md_path = Path(args.out + ".json"), Path(args.out + ".md")
    stored = load_json(json_path) if json_path.exists() and args.cases else {}
    results = stored.get("cases", {})
    fx = Fixtures(work)
    t_all = time.monotonic()
    try:
        for cid in chosen:
            cs = known[cid]
            cdir = work / "cases" / cid
            shutil.rmtree(cdir, ignore_errors=True)
            cdir.mkdir(parents=True)
            t0 = time.monotonic()
            try:
                res = cs.body(Ctx(fx, cdir))
            except Exception as e:  # the driver's own failure is a row too, not a lost run
                res = Result([], f"error in the driver: {type(e).__name__}: {e}")
            for n, r in enumerate(res.runs):  # the whole output of each run, beside its case's files
                (cdir / f"run{n}.log").write_text(" ".join(r.cmd) + "\n\n" + r.output)
            results[cid] = dict(
                verdict=res.verdict, note=res.note, seconds=round(time.monotonic() - t0, 1),
                runs=[dict(command=" ".join(short(a, work, 200) for a in r.cmd), rc=r.rc, seconds=r.seconds,
                           message=short(r.message(), work), left=r.left, peak_mb=r.peak_mb,
                           disk=r.holds, files=r.disk[:40]) for r in res.runs])
            print(f"{cid}: {res.verdict}  ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    total = round(time.monotonic() - t_all, 1)
    counts = {k: sum(1 for r in results.values() if r["verdict"].startswith(k)) for k in ("pass", "fail", "error")}
    meta = dict(command="OMP_NUM_THREADS=1 python tools/fault_rerun.py" + (
        f" --cases {' '.join(chosen)}" if args.cases else ""), machine=machine(),
        wall_s=total if not args.cases else stored.get("wall_s"), counts=counts,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if args.cases:
        meta["reruns"] = stored.get("reruns", []) + [dict(cases=chosen, wall_s=total, date=meta["date"])]
        meta["command"] = stored.get("command", meta["command"])
        meta["date"] = stored.get("date", meta["date"])  # the whole run's; each re-run has its own
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(dict(meta, cases=results), indent=1))
    print(write_markdown(md_path, meta, results))
    print(f"\n{counts}; wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
