"""Checkpoints: atomic writes, safe loads, discovery of the newest good file.

* A checkpoint is written to a temporary file in the same folder, flushed and
  fsync-ed, then renamed: a crash mid-write never leaves a half-written file
  under a checkpoint name.
* A training checkpoint gets a small JSON sidecar, ``<name>.json``: the SHA-256 and size of
  the file, and the progress it records (epoch, samples consumed, timeline, model name). Auto-resume
  ranks candidates by reading only the sidecars and verifies the checksum of the one it loads, so
  a flipped byte is reported by name and the file skipped. The sidecar is written *before* the
  checkpoint is renamed into place and keeps the digest of the file it replaces too, so a kill
  between the two renames leaves a pair that still verifies. Files without a sidecar (older runs,
  the reference's) are read with ``mmap`` (the pickle only, no tensor data) to rank them.
* Every load is ``torch.load(weights_only=True)``. The reference's files pickle
  an ``argparse.Namespace`` (under ``args``); exactly that type is allowed, and
  any other pickled object is refused with a message saying why.
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from engine import safe_archive
from errors import CheckpointError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pth$")
LAST_NAME = "checkpoint-last.pth"



def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


SIDECAR_FORMAT = 1


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


class _HashingWriter:
    """What torch.save writes to: the file, with the SHA-256 and size computed on the way."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_json_atomic(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; files get the usual 0644 (umask 022)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _entries(side: dict) -> list[dict]:
    prev = side.get("previous") or []
    prev = [prev] if isinstance(prev, dict) else prev
    return [e for e in [side.get("current"), *prev] if isinstance(e, dict)]


def read_sidecar(path: str | os.PathLike) -> Optional[dict]:
    """The sidecar of ``path`` ({'current': meta, 'previous': [meta, ...]}), or None if absent or unreadable."""
    try:
        data = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("current"), dict):
        return None
    return data


def save_atomic(obj: Any, path: str | os.PathLike, meta: Optional[dict] = None) -> Path:
    """Write ``obj`` to ``path`` through a fsync-ed temporary file and a rename.

    With ``meta`` (a training checkpoint), the sidecar is written first: it records the new file's
    digest and size with ``meta`` as 'current' and the replaced file's entry as 'previous'. Without
    ``meta`` a stale sidecar of an earlier checkpoint at ``path`` is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    side = sidecar_path(path)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint gets the usual 0644 (umask 022)
        with os.fdopen(fd, "wb") as f:
            w = _HashingWriter(f)
            torch.save(obj, w)
            f.flush()
            os.fsync(f.fileno())
        if meta is not None:
            # 'previous': what the file on disk may be. The old sidecar's entries (its 'current' may never
            # have landed if a kill came between its sidecar and its rename, so keep its 'previous' too).
            old = read_sidecar(path)
            previous = _entries(old) if old else []
            size = path.stat().st_size if path.is_file() else None
            if size is not None and not any(e.get("bytes") == size for e in previous):
                previous = [{"sha256": file_sha256(path), "bytes": size}]  # a file from before sidecars
            _write_json_atomic({"format": SIDECAR_FORMAT, "file": path.name,
                                "current": {**meta, "sha256": w.sha.hexdigest(), "bytes": w.size},
                                "previous": previous[:2]}, side)
        os.replace(tmp, path)
        if meta is None and side.exists():
            side.unlink()
        _fsync_dir(path.parent)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        disk = _file_system_error(e)
        if disk is not None:  # a full disk, a lost mount: one line naming the checkpoint (config.cli.run_main)
            raise OSError(disk.errno, disk.strerror, str(path)) from e
        raise
    return path


def _file_system_error(e: BaseException) -> Optional[OSError]:
    """The OSError without a file name behind ``e``, if any: a write to a full disk raises ENOSPC with no
    name, and torch.save's zip writer then hides it behind a RuntimeError ("unexpected pos") when it
    closes the archive on the way out."""
    seen = 0
    while e is not None and seen < 4:
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def verify(path: str | os.PathLike) -> Optional[dict]:
    """Check ``path`` against its sidecar; returns the entry it matches (None: no sidecar to check).

    Raises CheckpointError naming the file when its digest matches neither entry."""
    side = read_sidecar(path)
    if side is None:
        return None
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    entries = _entries(side)
    if any(e.get("bytes") == size for e in entries):
        digest = file_sha256(path)
        for e in entries:
            if e.get("sha256") == digest:
                return e
    raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match the one recorded in "
                          f"{sidecar_path(path).name} when it was written")


def remove_stale_temps(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of writes that a kill interrupted (``.checkpoint-*.tmp``)."""
    out = Path(output_dir)
    removed = []
    if out.is_dir():
        for p in out.iterdir():
            if p.name.startswith(".checkpoint-") and p.name.endswith(".tmp") and p.is_file():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint without executing pickled code (tensors, containers, argparse.Namespace)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    safe_archive.inspect_archive(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
        safe_archive.check_loaded(obj, path)
        return obj
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        detail = next((l for l in lines if "GLOBAL" in l or "Unsupported global" in l), "")
        if not detail:  # not an unsafe object: the file itself is damaged (torch's own advice is left out)
            after = str(e).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            reason = after[0].strip() if after and "WeightsUnpickler" in str(e) else "unreadable pickle"
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt, or uses pickle opcodes that safe "
                                  f"loading does not support ({reason}); torch.save's default protocol 2 "
                                  f"always loads") from None
        raise CheckpointError(
            f"refused to load {path}: it needs a pickled object other than tensors, plain containers and "
            f"argparse.Namespace, and loading it could execute code ({detail.strip()})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    except Exception as e:  # e.g. a TypeError from odd argparse.Namespace state: never a raw exception
        raise CheckpointError(f"checkpoint {path} is malformed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Numbered checkpoints in ``output_dir``, newest epoch first, then ``checkpoint-last.pth``."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    numbered = sorted(((int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name))),
                      reverse=True)
    found = [p for _, p in numbered]
    last = out / LAST_NAME
    if last.is_file():
        found.insert(0, last)
    return found


def progress_key(meta: dict) -> tuple:
    """Order of recorded progress: timeline (it grows with every explicit --resume, so files of an
    abandoned branch never win), then epoch, then samples consumed in it; a complete epoch e ranks as
    the start of epoch e + 1."""
    timeline = int(meta.get("timeline") or 0)
    epoch = int(meta.get("epoch", -1))
    if meta.get("next_step"):
        return timeline, epoch, int(meta.get("samples") or meta["next_step"])
    return timeline, epoch + 1, 0


def peek(path: str | os.PathLike) -> dict:
    """The progress a checkpoint records, read cheaply: from its sidecar, else from its pickle
    through ``mmap`` (tensor data is not read). Raises CheckpointError for an unreadable file."""
    side = read_sidecar(path)
    if side is not None:
        return side["current"]
    return _peek_pickle(path)


def _peek_pickle(path: str | os.PathLike) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {type(e).__name__}") from None
    if not isinstance(ckpt, dict):
        return {}
    meta = {k: ckpt[k] for k in ("epoch", "next_step", "samples", "timeline", "model_name")
            if k in ckpt and isinstance(ckpt[k], (int, str))}
    del ckpt
    return meta


def _load_leniently(path: str | os.PathLike):
    """The checkpoint at ``path`` (weights-only, memory-mapped, flags as a Namespace), or None when it
    cannot be read: for the questions below, whose answer is "unknown" for such a file."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return None


def stored_model_name(path: str | os.PathLike) -> Optional[str]:
    """The registered name of the model a checkpoint holds, when it says (ours do; the reference's
    keep it in their ``args``); read without loading the weights."""
    try:
        meta = peek(path)
    except CheckpointError:
        return None
    if isinstance(meta.get("model_name"), str):
        return meta["model_name"]
    ckpt = _load_leniently(path)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    return getattr(args, "model", None) if isinstance(getattr(args, "model", None), str) else None


def stored_pixels(path: str | os.PathLike):
    """The channels and normalisation statistics a checkpoint's run kept in its flags (``in_chans``,
    ``norm_mean``, ``norm_std``: imagedata.normstats) as ``imagedata.channels.Pixels``, or None when it
    kept none (the reference's, a bare state dict: RGB with ImageNet's); read as stored_model_name reads."""
    from imagedata.channels import Pixels
    ckpt = _load_leniently(path)
    flags = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(flags, dict) or not flags.get("norm_mean") or not flags.get("norm_std"):
        return None
    mean, std = flags["norm_mean"], flags["norm_std"]
    return Pixels(int(flags.get("in_chans") or len(mean)), tuple(float(x) for x in mean),
                  tuple(float(x) for x in std))


def load_latest(output_dir: str | os.PathLike, log=print,
                check: Optional[Callable[[Path, dict], Optional[str]]] = None) -> Optional[tuple[Path, dict]]:
    """The checkpoint in ``output_dir`` with the most recorded progress that verifies, loads and fits.

    Candidates are ranked by ``progress_key`` without loading them in full; each is then verified
    against its checksum, loaded, and passed to ``check(path, ckpt)``, which returns why it does not
    fit (or None) and may raise to stop the search. Every skipped file is logged with its reason."""
    heap = []
    for order, path in enumerate(list_checkpoints(output_dir)):
        try:
            meta = peek(path)
        except CheckpointError as e:
            log(f"warning: skipped {path.name}: {e}")
            continue
        heapq.heappush(heap, (tuple(-x for x in progress_key(meta)), order, str(path), False))
    while heap:
        neg_key, order, name, verified = heapq.heappop(heap)
        path = Path(name)
        if not verified:
            try:
                entry = verify(path)
            except CheckpointError as e:
                log(f"warning: skipped {path.name}: {e}")
                continue
            if entry is not None and "epoch" not in entry:  # the replaced file predates sidecars
                try:
                    entry = _peek_pickle(path)
                except CheckpointError as e:
                    log(f"warning: skipped {path.name}: {e}")
                    continue
            if entry is not None and tuple(-x for x in progress_key(entry)) != neg_key:
                # a kill between sidecar and rename: the file is the previous one; rank it as what it is
                heapq.heappush(heap, (tuple(-x for x in progress_key(entry)), order, name, True))
                continue
        try:
            ckpt = safe_load(path)
        except CheckpointError as e:
            log(f"warning: skipped {path.name}: {e}")
            continue
        if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
            log(f"warning: skipped {path.name}: not a training checkpoint (no 'model' and 'epoch')")
            continue
        reason = check(path, ckpt) if check is not None else None
        if reason:
            log(f"warning: skipped {path.name}: {reason}")
            continue
        return path, ckpt
    return None


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Keep only the ``keep_last`` newest numbered checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    numbered = [p for p in list_checkpoints(output_dir) if p.name != LAST_NAME]
    for p in numbered[keep_last:]:
        try:
            p.unlink()
            sidecar_path(p).unlink(missing_ok=True)
        except OSError as e:  # another process may have removed it
            warnings.warn(f"could not remove old checkpoint {p}: {e}")


def unwrap_state_dict(ckpt: Any) -> dict:
    """The model weights in any of the layouts users hold: {'model': ...}, {'state_dict': ...} or bare."""
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "module"):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError("file holds no state dict of tensors")
    if ckpt and all(k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    return ckpt
