"""The primitives every image pipeline shares: normalisation constants, file types, 8-bit RGB
decoding, a file's bytes (``Encoded``), per-sample seeding and naming a skipped sample.

Nothing here imports another module of the package, so the listing (datasets.py), the decoders
(decode.py) and the tar shards (shards.py) can all build on it without importing each other.
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".npy")
SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "data" / "sample_images"


PRETRAIN_SCALE = (0.2, 1.0)


HUGE_PIXELS = 50_000_000  # decoded in full, such an image costs > 150 MB per worker and seconds per epoch


def to_rgb8(img: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel, scaling high-bit-depth modes instead of clipping them.

    PIL's ``convert("RGB")`` clips 16-bit grey ("I;16", "I") to 255: a 16-bit photo comes out
    almost white. 16-bit data is scaled by 255/65535; 32-bit integers ("I") by their bit depth;
    float images ("F") from [0, 1] or, when larger, from [0, 255] (clipped)."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        if mode == "F":
            a = a.astype(np.float64)
            a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
            a = np.clip(np.nan_to_num(a), 0, 255)
        else:
            a = a.astype(np.int64)
            top = 65535 if mode.startswith("I;16") else max(65535, (1 << int(a.max()).bit_length()) - 1)
            a = np.clip(a, 0, None) * 255.0 / top
        g = np.rint(a).astype(np.uint8)
        return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB")
    return img.convert("RGB")


def decode_rgb(f, name: str, min_side: Optional[int], warned_huge: set) -> Image.Image:
    """Decode an image file object to 8-bit RGB; a JPEG whose sides are both >= 2 * min_side at a
    reduced DCT scale (PIL ``draft``), a huge image of another format in full, named once."""
    img = Image.open(f)
    w, h = img.size
    if min_side and img.format == "JPEG" and min(w, h) >= 2 * min_side:
        img.draft("RGB", (min_side, min_side))
    elif w * h > HUGE_PIXELS and name not in warned_huge:
        warned_huge.add(name)
        warnings.warn(f"image {name} is {w}x{h} ({w * h / 1e6:.0f} MP, {img.format}): decoded at full size "
                      f"every epoch (only JPEG can be decoded at a reduced scale); resizing the data set "
                      f"once saves memory and time")
    return to_rgb8(img)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed independent of workers and resumption."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2 ** 63 - 1)


@dataclass
class Encoded:
    """An image file's bytes as a worker read them; ``name`` says where from (for warnings)."""
    data: bytes
    name: str


def seeded_apply(transform: Callable, img, seed: int):
    """``transform(img)`` with torch's CPU generator, ``random`` and NumPy seeded from ``seed``; the
    global states are restored. A transform marked ``torch_rng_only`` (torchvision's crops and flips
    draw from torch alone) skips ``random`` and NumPy, whose state round trip costs ~0.15 ms."""
    # (default_generator.manual_seed: torch.manual_seed also reseeds every device, ~0.2 ms a call)
    if getattr(transform, "torch_rng_only", False):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return transform(img)
    # timm's RandAugment / RandomErasing also draw from `random` and NumPy: seed all three, then restore.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            return transform(img)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


SKIP_LOG_ENV = "MIM_SKIPPED_SAMPLES"      # the run's list of skipped samples (set by engine.trainer.Trainer.fit)


def skip_sample(name: str, error, warned: set, what: str = "image") -> None:
    """Report a sample that a data path cannot use; the caller replaces it and flags it (ok = 0).

    Named once per data set and process: a warning, and a line ``name<TAB>reason`` appended to the
    run's skipped-samples.txt (DataLoader workers inherit its path through SKIP_LOG_ENV). One
    ``write`` per line, so lines of several workers do not interleave."""
    if name in warned:
        return
    warned.add(name)
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    reason = " ".join(reason.split())
    warnings.warn(f"skipping unreadable {what} {name}: {reason}")
    path = os.environ.get(SKIP_LOG_ENV)
    if path:
        try:
            with open(path, "a") as f:
                f.write(f"{name}\t{reason}\n")
        except OSError:
            pass  # the list is a convenience; the warning has named the sample
