"""A small generated data set for multi-channel and high-bit-depth pretraining: ImageNet layout
(``train/<class>/``, ``val/<class>/``), one file per tile.

    python tools/make_multispectral.py --out data/ms13 --bands 13 --format tiff        # 13-band float32 TIFF
    python tools/make_multispectral.py --out data/grey16 --bands 1 --format png16      # 16-bit grey PNG
    python tools/make_multispectral.py --out data/ms4 --bands 4 --format npy           # (H, W, C) float32 .npy

Each tile is a scene of smooth fields (a sum of random low-frequency waves) with objects on it; the
class decides the objects' shape (discs, squares, horizontal or vertical bars, rings) and each
object and the background have their own spectrum over the bands (a random smooth curve over the band
index), so neither one band nor a colour alone tells the class: the shapes and the spectra do. Fully
determined by ``--seed``; ``--format png16`` writes 16-bit values whose low byte matters (an 8-bit
conversion would lose them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from errors import UsageError  # noqa: E402

CLASSES = ("discs", "squares", "hbars", "vbars", "rings")
FORMATS = ("tiff", "png16", "npy")


def _spectrum(rng: np.random.Generator, bands: int) -> np.ndarray:
    """A smooth random reflectance curve over the bands, in (0.05, 0.95): (bands,)."""
    k = np.arange(bands) / max(bands - 1, 1)
    curve = rng.uniform(0.2, 0.6) + sum(rng.uniform(-0.2, 0.2) * np.cos(np.pi * f * k + rng.uniform(0, np.pi))
                                        for f in (1, 2, 3))
    return np.clip(curve, 0.05, 0.95)


def _shape_mask(cls: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float in [0, 1]: 2-4 objects of the class's shape, soft edges."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.zeros((size, size))
    for _ in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        r = rng.uniform(0.08, 0.16) * size
        if cls == "discs":
            d = np.hypot(y - cy, x - cx) - r
        elif cls == "squares":
            d = np.maximum(abs(y - cy), abs(x - cx)) - r
        elif cls == "hbars":
            d = np.maximum(abs(y - cy) - r / 3, abs(x - cx) - 2 * r)
        elif cls == "vbars":
            d = np.maximum(abs(x - cx) - r / 3, abs(y - cy) - 2 * r)
        else:  # rings
            d = abs(np.hypot(y - cy, x - cx) - r) - r / 4
        out = np.maximum(out, np.clip(0.5 - d, 0, 1))
    return out


def tile(cls: str, size: int, bands: int, rng: np.random.Generator) -> np.ndarray:
    """One tile: (size, size, bands) float32 in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] / size
    field = sum(rng.uniform(0.02, 0.08) * np.sin(2 * np.pi * (rng.uniform(0.5, 2.5) * y + rng.uniform(0.5, 2.5) * x)
                                                 + rng.uniform(0, 2 * np.pi)) for _ in range(3))
    background = _spectrum(rng, bands)[None, None, :] + field[:, :, None]
    objects = _shape_mask(cls, size, rng)[:, :, None]
    img = background * (1 - objects) + _spectrum(rng, bands)[None, None, :] * objects
    img += rng.normal(0, 0.01, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def write(img: np.ndarray, path: Path, fmt: str) -> Path:
    if fmt == "npy":
        path = path.with_suffix(".npy")
        np.save(path, img)
    elif fmt == "png16":
        from PIL import Image
        if img.shape[2] != 1:
            raise UsageError(f"--format png16 writes grey images: use --bands 1 (got {img.shape[2]})")
        path = path.with_suffix(".png")
        Image.fromarray(np.rint(img[:, :, 0] * 65535).astype(np.uint16)).save(path)
    else:
        import tifffile
        path = path.with_suffix(".tif")
        tifffile.imwrite(path, img, photometric="minisblack", planarconfig="contig")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write (train/ and val/ in ImageNet layout)")
    p.add_argument("--bands", type=int, default=13, help="channels per tile")
    p.add_argument("--size", type=int, default=64, help="tile side, pixels")
    p.add_argument("--train_per_class", type=int, default=40)
    p.add_argument("--val_per_class", type=int, default=10)
    p.add_argument("--format", default="tiff", choices=FORMATS,
                   help="tiff: float32 multi-band TIFF; png16: 16-bit grey PNG (--bands 1); npy: (H, W, C) float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.bands < 1 or args.size < 8:
        raise UsageError(f"--bands must be >= 1 and --size >= 8, got {args.bands} and {args.size}")
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    n = 0
    for split, per_class in (("train", args.train_per_class), ("val", args.val_per_class)):
        for cls in CLASSES:
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                write(tile(cls, args.size, args.bands, rng), folder / f"{cls}_{i:04d}", args.format)
                n += 1
    print(f"wrote {n} tiles ({args.bands} bands, {args.size} px, {args.format}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
