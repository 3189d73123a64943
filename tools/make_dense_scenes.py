"""Dense scenes from real silhouettes: animal-mnist animals pasted on textured backgrounds.

    python tools/make_dense_scenes.py --out work_dirs/dense_scenes            # the set of the dense experiment
    python tools/make_dense_scenes.py --out /tmp/scenes --train 8 --dev 4 --test 4 --per_class 4

Each scene is W x H px (W, H uniform in [--min_size, --max_size]) with a procedural texture
(smooth noise, stripes, checks or blobs between two random colours, plus pixel noise) and 1 to
``--max_objects`` animals. An animal is one of the 28x28 animal-mnist silhouettes resized to a
random side in [--min_object, --max_object] px (optionally mirrored), thresholded at half
intensity, and painted in a random colour that differs from both background colours. The mask
is exactly the painted pixels; an animal painted later may hide part of an earlier one, whose
mask loses those pixels (a placement that would hide more than 30 % of an earlier animal, or
leave it under 16 px, is redrawn). So every box (the mask's tight box), instance mask and label
map is exact. Deterministic for a seed.

Which silhouettes go where (animal-mnist's fixed split of ``imagedata.animal_mnist.split_indices``,
seed 0: 2,000 test silhouettes, 8,000 others):

    train scenes   silhouettes of pool A (640 per class of the 8,000)   also the pretraining images
    dev scenes     silhouettes of pool B (the other 160 per class)      never pretrained on
    test scenes    the 2,000 test silhouettes                           never pretrained on

Written once under ``--out``:

    scenes/{train,dev,test}/NNNNNN.png   the scenes;  scenes/{split}_labels/NNNNNN.png: label maps
    coco_dev/ , coco_test/               COCO layout: train2017 = the train scenes; val2017 = dev or test
        annotations/instances_{train,val}2017.json  (10 categories, id k+1 = animal-mnist class k;
        boxes, exact RLE masks, areas)
    ade_dev/ , ade_test/                 ADE20K layout (images/, annotations/ {training,validation});
                                         label 0 = background, k+1 = class k (--no_reduce_zero_label,
                                         11 classes)
    pretrain_scenes/train/scene/*.png    the train scenes, unlabelled: the dense experiment's
                                         pretraining set (links to scenes/train)
    pretrain/train/<class>/*.png         pool A as 32-px images (the silhouette centred on black, as
                                         the classification experiment), labels unused
    classify/{train,val}/<class>/*.png   pool A labelled / pool B: for an intermediate classification
                                         finetuning (never a test silhouette; the dense experiment
                                         does not run one yet)
    scenes.json                          the settings, counts and silhouette ids of every part;
                                         a finished write is reused when the settings match
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
import sys

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from imagedata.animal_mnist import CLASSES, load_animal_mnist, split_indices  # noqa: E402

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class SceneSpec:
    """Everything that decides the written set (recorded in scenes.json)."""
    n_train: int = 2000
    n_dev: int = 300
    n_test: int = 600
    min_size: int = 64
    max_size: int = 128
    min_object: int = 20
    max_object: int = 56
    max_objects: int = 4
    pool_b_per_class: int = 160        # of each class's 800 non-test silhouettes: the dev pool
    per_class: int | None = None       # use only the first N silhouettes per class of each pool (tests)
    seed: int = 0


def silhouette_pools(labels: np.ndarray, spec: SceneSpec) -> dict[str, list[int]]:
    """Indices into animal-mnist: pool A (train scenes + pretraining), pool B (dev scenes) and the
    test silhouettes, each stratified by class and disjoint from the others."""
    base = split_indices(labels, seed=0)
    rng = np.random.default_rng([spec.seed, 1])
    pools: dict[str, list[int]] = {"train": [], "dev": [], "test": []}
    for c in range(len(CLASSES)):
        mine = rng.permutation([i for i in base["pretrain"] if labels[i] == c])
        test = [i for i in base["test"] if labels[i] == c]
        b, a = mine[:spec.pool_b_per_class].tolist(), mine[spec.pool_b_per_class:].tolist()
        n = spec.per_class
        pools["train"] += a[:n] if n else a
        pools["dev"] += b[:n] if n else b
        pools["test"] += test[:n] if n else test
    out = {k: sorted(int(i) for i in v) for k, v in pools.items()}
    if set(out["test"]) & (set(out["train"]) | set(out["dev"])) or set(out["train"]) & set(out["dev"]):
        raise AssertionError("silhouette pools overlap")
    return out


# ----------------------------------------------------------------------------------- drawing

def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) float field in [0, 1]: one of four procedural textures."""
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:    # smooth noise: a coarse random grid, bilinearly enlarged
        g = int(rng.integers(3, 9))
        coarse = Image.fromarray((rng.random((g, g)) * 255).astype(np.uint8))
        t = np.asarray(coarse.resize((w, h), Image.BILINEAR), np.float32) / 255
    elif kind == 1:  # stripes at a random angle and period
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period + rng.uniform(0, 6.3))
    elif kind == 2:  # checks
        cell = int(rng.integers(6, 20))
        t = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    else:            # soft blobs
        t = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(3, 8))):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(6, 30)
            t = np.maximum(t, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    return t


def _colour(rng: np.random.Generator, avoid: list[np.ndarray], margin: float = 90.0) -> np.ndarray:
    """A random RGB colour at least ``margin`` (Euclidean) from each colour in ``avoid``."""
    for _ in range(100):
        c = rng.uniform(0, 255, 3)
        if all(np.linalg.norm(c - a) >= margin for a in avoid):
            return c
    return 255 - np.mean(avoid, axis=0)  # the complement of the mean: far enough in practice


def _silhouette_mask(img28: np.ndarray, side: int, mirror: bool) -> np.ndarray:
    """(side, side) bool: the silhouette resized bilinearly, thresholded at half intensity."""
    m = np.asarray(Image.fromarray(img28).resize((side, side), Image.BILINEAR)) >= 128
    return m[:, ::-1] if mirror else m


def make_scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, pool: list[int],
               spec: SceneSpec) -> tuple[np.ndarray, list[dict]]:
    """-> (H, W, 3) uint8 scene, [{"class", "silhouette", "mask" (H, W) bool}] (every mask non-empty,
    exactly the pixels painted in that animal's colour)."""
    w, h = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    scene = c1 + (c2 - c1) * _texture(rng, h, w)[..., None] + rng.normal(0, 8, (h, w, 3))
    objects: list[dict] = []
    owner = np.full((h, w), -1, np.int64)  # which object each pixel shows
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        idx = int(pool[int(rng.integers(len(pool)))])
        for _try in range(20):
            side = int(rng.integers(spec.min_object, min(spec.max_object, w, h) + 1))
            m = _silhouette_mask(images[idx], side, bool(rng.integers(2)))
            if m.sum() < 16:
                continue
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            full = np.zeros((h, w), bool)
            full[y0:y0 + side, x0:x0 + side] = m
            ok = True
            for k, o in enumerate(objects):
                left = (owner == k) & ~full
                if left.sum() < max(16, 0.7 * o["area0"]):
                    ok = False
                    break
            if ok:
                break
        else:
            continue
        colour = _colour(rng, [c1, c2])
        paint = colour + rng.normal(0, 10, (h, w, 3))
        scene[full] = paint[full]
        owner[full] = len(objects)
        objects.append({"class": int(labels[idx]), "silhouette": idx, "area0": int(full.sum())})
    scene = np.clip(scene, 0, 255).astype(np.uint8)
    for k, o in enumerate(objects):
        o["mask"] = owner == k
        del o["area0"]
    return scene, objects


# ----------------------------------------------------------------------------------- writing

def _coco_annotation(ann_id: int, img_id: int, cls: int, m: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    x, y, bw, bh = (int(v) for v in mask_utils.toBbox(rle))
    return {"id": ann_id, "image_id": img_id, "category_id": cls + 1, "iscrowd": 0, "area": int(m.sum()),
            "bbox": [x, y, bw, bh], "segmentation": {"size": [int(s) for s in rle["size"]],
                                                      "counts": rle["counts"].decode("ascii")}}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_split(root: Path, split: str, n: int, images: np.ndarray, labels: np.ndarray, pool: list[int],
                 spec: SceneSpec) -> dict:
    """Write ``n`` scenes and their label maps; return the COCO dict of the split."""
    rng = np.random.default_rng([spec.seed, 2, SPLITS.index(split)])
    img_dir, lab_dir = root / "scenes" / split, root / "scenes" / f"{split}_labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    coco_images, anns, used = [], [], set()
    for k in range(n):
        scene, objects = make_scene(rng, images, labels, pool, spec)
        name = f"{k + 1:06d}.png"
        Image.fromarray(scene).save(img_dir / name)
        label_map = np.zeros(scene.shape[:2], np.uint8)
        for o in objects:
            label_map[o["mask"]] = o["class"] + 1
            anns.append(_coco_annotation(len(anns) + 1, k + 1, o["class"], o["mask"]))
            used.add(o["silhouette"])
        Image.fromarray(label_map).save(lab_dir / name)
        coco_images.append({"id": k + 1, "file_name": name, "width": scene.shape[1], "height": scene.shape[0]})
    cats = [{"id": c + 1, "name": name, "supercategory": "animal"} for c, name in enumerate(CLASSES)]
    return {"images": coco_images, "annotations": anns, "categories": cats, "silhouettes_used": sorted(used)}


def _save32(img28: np.ndarray, path: Path) -> None:
    canvas = np.zeros((32, 32), np.uint8)
    canvas[2:30, 2:30] = img28
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).convert("RGB").save(path)


def _link_pretrain_scenes(root: Path) -> None:
    """pretrain_scenes/train/scene/: the train scenes as one unlabelled image folder (what
    main_pretrain.py reads); idempotent."""
    for src in sorted((root / "scenes" / "train").glob("*.png")):
        dst = root / "pretrain_scenes" / "train" / "scene" / src.name
        if not dst.exists():
            _link(src, dst)


def write_scenes(out: str | os.PathLike, spec: SceneSpec = SceneSpec()) -> Path:
    """Write the whole set once (see the module docstring); an existing set with the same settings is
    reused. Returns ``out``."""
    root = Path(out)
    marker = root / "scenes.json"
    settings = asdict(spec)
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        _link_pretrain_scenes(root)
        return root
    if marker.exists():
        marker.unlink()  # a set written with other settings: rewrite it
    for part in ("scenes", "coco_dev", "coco_test", "ade_dev", "ade_test", "pretrain", "classify", "pretrain_scenes"):
        shutil.rmtree(root / part, ignore_errors=True)
    images, labels = load_animal_mnist()
    pools = silhouette_pools(labels, spec)
    counts = {"train": spec.n_train, "dev": spec.n_dev, "test": spec.n_test}
    coco = {s: _write_split(root, s, counts[s], images, labels, pools[s], spec) for s in SPLITS}
    used = {s: coco[s].pop("silhouettes_used") for s in SPLITS}
    # the 32-px silhouettes: pool A unlabelled for pretraining, A / B labelled for classification
    for i in pools["train"]:
        _save32(images[i], root / "pretrain" / "train" / CLASSES[labels[i]] / f"{i:05d}.png")
        _link(root / "pretrain" / "train" / CLASSES[labels[i]] / f"{i:05d}.png",
              root / "classify" / "train" / CLASSES[labels[i]] / f"{i:05d}.png")
    for i in pools["dev"]:
        _save32(images[i], root / "classify" / "val" / CLASSES[labels[i]] / f"{i:05d}.png")
    for held in ("dev", "test"):
        (root / f"coco_{held}" / "annotations").mkdir(parents=True, exist_ok=True)
        for sub, split in (("train", "train"), ("val", held)):
            (root / f"coco_{held}" / "annotations" / f"instances_{sub}2017.json").write_text(json.dumps(coco[split]))
            ade = "training" if sub == "train" else "validation"
            for im in coco[split]["images"]:
                name = im["file_name"]
                _link(root / "scenes" / split / name, root / f"coco_{held}" / f"{sub}2017" / name)
                stem = f"scene_{split}_{Path(name).stem}"
                _link(root / "scenes" / split / name, root / f"ade_{held}" / "images" / ade / f"{stem}.png")
                _link(root / "scenes" / f"{split}_labels" / name, root / f"ade_{held}" / "annotations" / ade / f"{stem}.png")
    _link_pretrain_scenes(root)
    pretrain_ids = set(pools["train"])
    for held in ("dev", "test"):  # the promise of the set, checked on what was written
        assert not set(used[held]) & pretrain_ids, f"{held} scenes contain pretraining silhouettes"
    digest = hashlib.sha256(json.dumps(pools).encode()).hexdigest()[:16]
    stats = {s: {"scenes": len(coco[s]["images"]), "objects": len(coco[s]["annotations"]),
                 "silhouettes_used": len(used[s])} for s in SPLITS}
    marker.write_text(json.dumps({"settings": settings, "pools_sha": digest, "stats": stats,
                                  "pools": {k: len(v) for k, v in pools.items()}, "silhouettes_used": used}))
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    d = SceneSpec()
    for k in ("train", "dev", "test"):
        p.add_argument(f"--{k}", type=int, default=getattr(d, f"n_{k}"), help=f"{k} scenes")
    for k in ("min_size", "max_size", "min_object", "max_object", "max_objects", "per_class", "seed"):
        p.add_argument(f"--{k}", type=int, default=getattr(d, k))
    a = p.parse_args(argv)
    spec = SceneSpec(n_train=a.train, n_dev=a.dev, n_test=a.test, min_size=a.min_size, max_size=a.max_size,
                     min_object=a.min_object, max_object=a.max_object, max_objects=a.max_objects,
                     per_class=a.per_class, seed=a.seed)
    if not 16 <= spec.min_size <= spec.max_size:
        p.error(f"need 16 <= --min_size <= --max_size, got {spec.min_size} {spec.max_size}")
    if not 8 <= spec.min_object <= spec.max_object or spec.min_object > spec.min_size:
        p.error(f"need 8 <= --min_object <= --max_object and --min_object <= --min_size, got "
                f"{spec.min_object} {spec.max_object} (min_size {spec.min_size})")
    root = write_scenes(a.out, spec)
    print(json.dumps(json.loads((root / "scenes.json").read_text())["stats"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
