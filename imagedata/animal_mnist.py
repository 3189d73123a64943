"""animal-mnist (PyPI ``animal-mnist``, MIT): 10,000 real 28x28 animal silhouettes, 10 balanced classes.

The package ships its data as gzip-compressed pickles of uint8 / int64 NumPy arrays. Unpickling
an arbitrary file can run code, so they are read with :class:`ArrayUnpickler`, which resolves
only the three globals NumPy's array pickles need; any other global (``os.system``,
``builtins.eval``, ...) is refused with :class:`UnsafePickleError` before anything is called.

:func:`write_split` turns the arrays into ImageNet-layout folders once, with a fixed seed::

    root/pretrain/train/<class>/*.png   8,000 images (800 per class), pretraining without labels
    root/test/<class>/*.png             2,000 held-out images (200 per class), never pretrained on
    root/l{n}/train/<class>/*.png       the first n per class of the pretraining images (nested:
                                        l10 in l50 in l200), labelled; root/l{n}/val = the test set
    root/dev/train = l50/train, root/dev/val = l200 minus l50 (150 per class): a validation split
                                        carved out of the labelled training data, for choices

Images are written at ``size`` px (default 32), the 28-px silhouette centred on black padding,
so 4-px mask units give an 8x8 unit grid without resampling the content.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CLASSES = tuple(f"class_{i}" for i in range(10))
DATA_FILE = "animal_data_version_3.gz"
LABEL_FILE = "animal_label_version_3.gz"
LABEL_BUDGETS = (10, 50, 200)
PRETRAIN_PER_CLASS = 800
TEST_PER_CLASS = 200


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that is not part of NumPy's array reconstruction."""


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain NumPy arrays and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise UnsafePickleError(f"refusing to unpickle global {module}.{name}: only NumPy arrays are allowed")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # NumPy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def load_array(path: str | os.PathLike) -> np.ndarray:
    """One gzip-compressed pickled array; anything else (code, objects, object arrays) is refused."""
    with gzip.open(path, "rb") as f:
        arr = ArrayUnpickler(f).load()
    if not isinstance(arr, np.ndarray) or arr.dtype == object:
        raise UnsafePickleError(f"{path}: expected a numeric NumPy array, got {type(arr).__name__}")
    return arr


def package_dir() -> Path:
    import animal_mnist  # installed --no-deps; we import nothing else from it (its loader needs tensorflow)
    return Path(animal_mnist.__file__).resolve().parent / "data" / "Animal_MNIST"


def load_animal_mnist(folder: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """images: (10000, 28, 28) uint8, labels: (10000,) int64 in 0..9."""
    folder = Path(folder) if folder is not None else package_dir()
    x, y = load_array(folder / DATA_FILE), load_array(folder / LABEL_FILE)
    if x.ndim != 3 or x.dtype != np.uint8 or y.shape != (x.shape[0],):
        raise ValueError(f"unexpected animal-mnist arrays: images {x.shape} {x.dtype}, labels {y.shape}")
    return x, y.astype(np.int64)


def split_indices(labels: np.ndarray, seed: int = 0, budgets: Sequence[int] = LABEL_BUDGETS,
                  pretrain_per_class: int = PRETRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS
                  ) -> dict[str, list[int]]:
    """Stratified, fixed-seed split: per class ``test_per_class`` test images, the next
    ``pretrain_per_class`` for pretraining; label budget n = the first n per class of that class's
    (shuffled) pretraining images, so the budgets are nested."""
    if max(budgets) > pretrain_per_class:
        raise ValueError(f"label budgets {list(budgets)} exceed {pretrain_per_class} images per class")
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"pretrain": [], "test": [], **{f"l{n}": [] for n in budgets}}
    for c in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test, pre = idx[:test_per_class], idx[test_per_class:test_per_class + pretrain_per_class]
        out["test"] += test.tolist()
        out["pretrain"] += pre.tolist()
        for n in budgets:
            out[f"l{n}"] += pre[:n].tolist()
    return {k: sorted(v) for k, v in out.items()}


def _save(img: np.ndarray, size: int, path: Path) -> None:
    pad = (size - img.shape[0]) // 2
    canvas = np.zeros((size, size), np.uint8)
    canvas[pad:pad + img.shape[0], pad:pad + img.shape[1]] = img
    Image.fromarray(canvas).convert("RGB").save(path)


def write_split(root: str | os.PathLike, size: int = 32, seed: int = 0, budgets: Sequence[int] = LABEL_BUDGETS,
                pretrain_per_class: int = PRETRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS) -> Path:
    """Write the folders once (a ``split.json`` marks a finished write; an existing one is reused when
    its settings match). Smaller ``*_per_class`` / ``budgets`` give the smoke test's miniature."""
    root = Path(root)
    x, y = load_animal_mnist()
    if size < x.shape[1]:
        raise ValueError(f"size {size} is smaller than the {x.shape[1]}-px images")
    parts = split_indices(y, seed, budgets, pretrain_per_class, test_per_class)
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    meta = {"size": size, "seed": seed, "split_sha": digest,
            "counts": {k: len(v) for k, v in parts.items()}}
    marker = root / "split.json"
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return root
    assert not set(parts["test"]) & set(parts["pretrain"]), "test images leaked into pretraining"
    base = root / "all"
    for i in sorted(set(parts["pretrain"]) | set(parts["test"])):
        folder = base / CLASSES[y[i]]
        folder.mkdir(parents=True, exist_ok=True)
        _save(x[i], size, folder / f"{i:05d}.png")

    def place(ids: list[int], dest: Path) -> None:
        for i in ids:
            folder = dest / CLASSES[y[i]]
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{i:05d}.png"
            if not target.exists():
                try:
                    os.link(base / CLASSES[y[i]] / f"{i:05d}.png", target)
                except OSError:
                    target.write_bytes((base / CLASSES[y[i]] / f"{i:05d}.png").read_bytes())
    place(parts["pretrain"], root / "pretrain" / "train")
    place(parts["test"], root / "test")
    budgets = sorted(int(k[1:]) for k in parts if k.startswith("l"))
    for n in budgets:
        place(parts[f"l{n}"], root / f"l{n}" / "train")
        place(parts["test"], root / f"l{n}" / "val")
    dev_train, dev_pool = f"l{budgets[1]}" if len(budgets) > 1 else f"l{budgets[0]}", f"l{budgets[-1]}"
    place(parts[dev_train], root / "dev" / "train")
    place(sorted(set(parts[dev_pool]) - set(parts[dev_train])), root / "dev" / "val")
    marker.write_text(json.dumps(meta))
    return root
