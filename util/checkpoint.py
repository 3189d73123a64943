"""Checkpoints: atomic writes, safe loads, discovery of the newest good file.

* A checkpoint is written to a temporary file in the same folder, flushed and
  fsync-ed, then renamed: a crash mid-write never leaves a half-written file
  under a checkpoint name.
* Every load is ``torch.load(weights_only=True)``. The reference's files pickle
  an ``argparse.Namespace`` (under ``args``); exactly that type is allowed, and
  any other pickled object is refused with a message saying why.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pth$")
LAST_NAME = "checkpoint-last.pth"


class CheckpointError(RuntimeError):
    """A checkpoint that does not exist, is damaged, or is unsafe to load."""


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


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint gets the usual 0644 (umask 022)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint without executing pickled code (tensors, containers, argparse.Namespace)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    from . import safe_archive  # bounded inspection: memory and time cannot exceed limits set by the model
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


def load_latest(output_dir: str | os.PathLike, log=print) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint in ``output_dir`` that loads; a damaged one is reported by name and skipped."""
    candidates = list_checkpoints(output_dir)
    best: Optional[tuple[int, Path, dict]] = None
    for path in candidates:
        try:
            ckpt = safe_load(path)
        except CheckpointError as e:
            log(f"warning: {e}; falling back to an older checkpoint")
            continue
        if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
            log(f"warning: {path} is not a training checkpoint; skipped")
            continue
        key = int(ckpt["epoch"]), ckpt.get("next_step") or (1 << 62)  # a complete epoch beats any part of it
        if best is None or key > best[0]:
            best = (key, path, ckpt)
    return (best[1], best[2]) if best else None


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Keep only the ``keep_last`` newest numbered checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    numbered = [p for p in list_checkpoints(output_dir) if p.name != LAST_NAME]
    for p in numbered[keep_last:]:
        try:
            p.unlink()
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
