"""Small crafted checkpoints that attack memory or time through what ``weights_only`` allows.

Used by tests/test_hostile_input.py and benchmarks/hostile_checkpoints.py. Each maker writes a
file of at most a few megabytes.
"""
from __future__ import annotations

import argparse
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch


class _Alloc:
    """Pickles as ``bytearray(n)``: a 600-byte file that asks for n bytes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self):
        return (bytearray, (self.n,))


def bytearray_bomb(path: Path, n: int = 1 << 30) -> Path:
    torch.save({"model": {}, "epoch": 0, "blob": _Alloc(n)}, path)
    return path


class _Storage:
    """Stands for storage '0' in torch's pickle (a persistent id, as torch.save writes it)."""


class _TensorOf:
    def __init__(self, numel: int) -> None:
        self.numel = numel

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (_Storage(), 0, (self.numel,), (1,), False, OrderedDict()))


class _Pickler(pickle.Pickler):
    def __init__(self, f, numel: int) -> None:
        super().__init__(f, protocol=2)
        self.numel = numel

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", self.numel)
        return None


def deflate_bomb(path: Path, n: int = 1 << 29) -> Path:
    """A torch zip whose one float storage of ``n`` zero bytes is deflate-compressed (~n/1000 on disk)."""
    import io
    buf = io.BytesIO()
    _Pickler(buf, n // 4).dump({"model": {"w": _TensorOf(n // 4)}, "epoch": 0})
    # the storage entry deflated, streamed in 1 MB chunks
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = bytes(1 << 20)
        with z.open(info, "w", force_zip64=True) as f:
            for _ in range(n // len(chunk)):
                f.write(chunk)
        z.writestr("archive/version", "3\n")
    return path


def shared_lists(depth: int = 60):
    """A list whose expanded tree has 2**depth leaves, pickled in a few hundred bytes (memo)."""
    x: list = [0.0]
    for _ in range(depth):
        x = [x, x]
    return x


def optimizer_expansion(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        depth: int = 60) -> Path:
    """A training checkpoint whose optimizer state holds a shared-list structure: Optimizer.load_state_dict
    copies it once per reference (2**depth)."""
    opt = optimizer.state_dict()
    opt["state"] = {0: {"step": torch.tensor(1.0), "exp_avg": shared_lists(depth)}}
    torch.save({"model": model.state_dict(), "optimizer": opt, "epoch": 0, "scaler": {}}, path)
    return path


def raw_pickle(path: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": [1.0, 2.0]}, "epoch": 0}, f, protocol=4)
    return path


class _OddNamespace:
    """Pickles as argparse.Namespace() followed by a BUILD with a list as its state."""

    def __reduce__(self):
        return (argparse.Namespace, (), [1, 2, 3])


def odd_namespace(path: Path) -> Path:
    torch.save({"model": {}, "epoch": 0, "args": _OddNamespace()}, path)
    return path


def odd_namespace_keys(path: Path) -> Path:
    class K:
        def __reduce__(self):
            return (argparse.Namespace, (), {3: "x", "lr": 0.1})
    torch.save({"model": {}, "epoch": 0, "args": K()}, path)
    return path


class _Big:
    def __init__(self, numel: int) -> None:
        self.numel = numel

    def __reduce__(self):
        return (torch.FloatTensor, (self.numel,))


def tensor_class_bomb(path: Path, numel: int = 1 << 28) -> Path:
    """``torch.FloatTensor(N)``: allowed by torch's safe loader, allocates 4N bytes."""
    torch.save({"model": {}, "epoch": 0, "blob": _Big(numel)}, path)
    return path
