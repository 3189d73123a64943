"""A tiny COCO-format detection / instance-segmentation set from the bundled photos, or a synthetic
annotation file at full COCO scale for memory and scoring measurements.

    python tools/make_tiny_coco.py --out work_dirs/tiny_coco --train 12 --val 4 --size 96
    python tools/make_tiny_coco.py --out /tmp/coco_full --synthetic 118287 860001

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


def write_synthetic_coco(out: str | Path, split: str = "train", images: int = 118_287, instances: int = 860_001,
                         size: tuple[int, int] = (32, 24), vertices: tuple[int, int] = (10, 50),
                         link_images: bool = True, seed: int = 0) -> Path:
    """``annotations/instances_{split}2017.json`` with COCO's scale and shape: ``images`` images of
    ``size`` (w, h) named like COCO's, ``instances`` annotations spread over them (Poisson counts),
    each with one polygon of U(``vertices``) points (two decimals; about COCO's file size at the
    defaults), a box, an area, 80 categories with COCO's ids. With ``link_images`` every file name is a
    symbolic link to one small PNG in ``{split}2017/`` (a full pass then decodes real files quickly).
    Written as a stream: memory stays small whatever the scale."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    w, h = size
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    img_dir = out / f"{split}2017"
    img_dir.mkdir(exist_ok=True)
    ids = np.arange(1, images + 1) * 3 + 7  # sparse, unordered-looking ids like COCO's
    rng.shuffle(ids)
    names = [f"{i:012d}.jpg" for i in ids]
    if link_images:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / "synthetic.png")
        for n in names:
            p = img_dir / n
            if not p.is_symlink():
                p.symlink_to("synthetic.png")
    coco_cats = [c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    owner = np.sort(rng.integers(0, images, instances))
    cats = rng.choice(coco_cats, instances)
    with open(out / "annotations" / f"instances_{split}2017.json", "w") as f:
        f.write('{"info": {"description": "synthetic, COCO scale"}, "licenses": [], "images": [')
        f.write(",".join(json.dumps({"id": int(i), "file_name": n, "width": w, "height": h})
                         for i, n in zip(ids, names)))
        f.write('], "annotations": [')
        for k in range(instances):
            n = int(rng.integers(*vertices))
            cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = rng.uniform(0.2, 0.45, n) * min(w, h)
            poly = np.round(np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).clip(0, [w, h]), 2)
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            ann = {"id": k + 1, "image_id": int(ids[owner[k]]), "category_id": int(cats[k]), "iscrowd": 0,
                   "area": float(round((x1 - x0) * (y1 - y0) * 0.6, 2)),
                   "bbox": [float(x0), float(y0), float(round(x1 - x0, 2)), float(round(y1 - y0, 2))],
                   "segmentation": [poly.reshape(-1).tolist()]}
            f.write(("," if k else "") + json.dumps(ann))
        f.write('], "categories": [')
        f.write(",".join(json.dumps({"id": c, "name": f"class_{c}", "supercategory": "synthetic"}) for c in coco_cats))
        f.write("]}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=12)
    p.add_argument("--val", type=int, default=4)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", type=int, nargs=2, metavar=("IMAGES", "INSTANCES"), default=None,
                   help="instead: a synthetic train annotation file of this scale (COCO train2017: 118287 860001)")
    a = p.parse_args()
    if a.synthetic:
        print(f"wrote {write_synthetic_coco(a.out, 'train', *a.synthetic, seed=a.seed)}")
        return 0
    print(f"wrote {make_tiny_coco(a.out, a.train, a.val, a.size, a.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
