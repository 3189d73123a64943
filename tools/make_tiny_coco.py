"""A tiny COCO-format detection / instance-segmentation set from the bundled photos.

    python tools/make_tiny_coco.py --out work_dirs/tiny_coco --train 12 --val 4 --size 96

Each image is a crop of one of data/sample_images with 1-3 solid shapes pasted on it
(categories 1 "square", 2 "disk", 3 "triangle"); every annotation's mask is exactly the
pasted pixels (RLE), its box the mask's tight box, its area the pixel count. Writes
``annotations/instances_{train,val}2017.json`` and ``{train,val}2017/*.png``. Deterministic
for a seed.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "data" / "sample_images"
CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "disk"}, {"id": 3, "name": "triangle"}]
COLOURS = {1: (230, 40, 40), 2: (40, 200, 60), 3: (40, 80, 230)}


def _shape_mask(cat: int, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    m = Image.new("L", size, 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    if cat == 1:
        d.rectangle([x0, y0, x1, y1], fill=1)
    elif cat == 2:
        d.ellipse([x0, y0, x1, y1], fill=1)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=1)
    return np.asarray(m, dtype=np.uint8)


def make_image(rng: random.Random, photos: list[Path], w: int, h: int):
    """A w x h crop of a random photo with 1-3 shapes; later shapes only take free pixels, so each
    mask is exactly the pixels painted in its colour. Returns (image, [(category, mask)])."""
    with Image.open(rng.choice(photos)) as im:
        photo = im.convert("RGB")
    pw, ph = photo.size
    cw = rng.uniform(0.3, 1.0) * min(pw, ph * w / h)
    ch = cw * h / w
    x, y = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
    arr = np.asarray(photo.crop((int(x), int(y), int(x + cw), int(y + ch))).resize((w, h), Image.BILINEAR)).copy()
    occupied = np.zeros((h, w), bool)
    shapes = []
    for _ in range(rng.randint(1, 3)):
        cat = rng.choice([1, 2, 3])
        bw, bh = rng.randint(w // 5, w // 2), rng.randint(h // 5, h // 2)
        x0, y0 = rng.randint(0, w - bw - 1), rng.randint(0, h - bh - 1)
        m = _shape_mask(cat, (w, h), (x0, y0, x0 + bw, y0 + bh)).astype(bool) & ~occupied
        if m.sum() < 20:
            continue
        occupied |= m
        arr[m] = COLOURS[cat]
        shapes.append((cat, m))
    return Image.fromarray(arr), shapes


def annotation(ann_id: int, img_id: int, cat: int, m: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils
    ys, xs = np.nonzero(m)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"id": ann_id, "image_id": img_id, "category_id": cat, "iscrowd": 0, "area": int(m.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}}


def make_tiny_coco(out: str | Path, n_train: int = 12, n_val: int = 4, size: int = 96, seed: int = 0) -> Path:
    out = Path(out)
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rng = random.Random(seed)
    ann_id = 1
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        (out / f"{split}2017").mkdir(exist_ok=True)
        images, anns = [], []
        for k in range(n):
            w, h = size + rng.choice([0, size // 4, -size // 8]), size  # a few aspect ratios
            img, shapes = make_image(rng, photos, w, h)
            img_id = k + 1
            name = f"{k:06d}.png"
            img.save(out / f"{split}2017" / name)
            images.append({"id": img_id, "file_name": name, "width": w, "height": h})
            for cat, m in shapes:
                if m.any():
                    anns.append(annotation(ann_id, img_id, cat, m))
                    ann_id += 1
        (out / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=12)
    p.add_argument("--val", type=int, default=4)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(f"wrote {make_tiny_coco(a.out, a.train, a.val, a.size, a.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
