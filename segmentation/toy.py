"""A tiny ADE20K-layout set made from the bundled photos: shapes pasted with exact label maps.

    python -m segmentation.toy /tmp/toy_seg --train 8 --val 4

Each image is a crop of a bundled photo (label 1, "scene") with a rectangle, an ellipse and a
triangle pasted in their own colours (labels 2, 3, 4) and a 2-pixel frame of label 0 (ignored,
as ADE20K's "other"). The same rasterised shape masks both the paste and the label map, so the
labels are exact. After reduce_zero_label the classes are 0..3 (``--nb_classes 4``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imagedata.images import SAMPLE_IMAGES
from imagedata.datasets import find_images

COLOURS = {2: (230, 40, 40), 3: (40, 200, 60), 4: (40, 80, 230)}
NUM_CLASSES = 4  # after reduce_zero_label


def _shape(draw: ImageDraw.ImageDraw, kind: int, box: tuple[int, int, int, int], fill: int) -> None:
    x0, y0, x1, y1 = box
    if kind == 2:
        draw.rectangle(box, fill=fill)
    elif kind == 3:
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_sample(photo: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """-> (RGB image, label map 'L') of ``size`` (w, h)."""
    w, h = size
    pw, ph = photo.size
    scale = max(w / pw, h / ph) * rng.uniform(1.0, 2.0)
    big = photo.resize((max(w, int(pw * scale + 0.5)), max(h, int(ph * scale + 0.5))), Image.BILINEAR)
    x, y = int(rng.integers(0, big.width - w + 1)), int(rng.integers(0, big.height - h + 1))
    img = big.crop((x, y, x + w, y + h)).convert("RGB")
    label = Image.new("L", size, 1)
    for kind in (2, 3, 4):
        bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
        bx, by = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        mask = Image.new("L", size, 0)
        _shape(ImageDraw.Draw(mask), kind, (bx, by, bx + bw, by + bh), 255)
        noise = rng.normal(0, 12, (h, w, 3))
        layer = Image.fromarray(np.clip(np.array(COLOURS[kind]) + noise, 0, 255).astype(np.uint8))
        img.paste(layer, (0, 0), mask)
        label.paste(kind, (0, 0), mask)
    frame = np.array(label)
    frame[:2], frame[-2:], frame[:, :2], frame[:, -2:] = 0, 0, 0, 0
    return img, Image.fromarray(frame)


def make_toy_ade(root: str | Path, n_train: int = 8, n_val: int = 4, size: tuple[int, int] = (96, 64),
                 seed: int = 0) -> Path:
    root = Path(root)
    photos = [Image.open(p).convert("RGB") for p in find_images(SAMPLE_IMAGES)]
    rng = np.random.default_rng(seed)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, label = make_sample(photos[i % len(photos)], rng, size)
            stem = f"toy_{split}_{i:05d}"
            img.save(root / "images" / split / f"{stem}.jpg", quality=95)
            label.save(root / "annotations" / split / f"{stem}.png")
    return root


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--train", type=int, default=8)
    p.add_argument("--val", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, default=(96, 64), help="width height")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(make_toy_ade(a.root, a.train, a.val, tuple(a.size), a.seed))
