"""COCO-layout detection data: start-up validation, compact annotations, the reference's pipelines,
mask pasting and pycocotools evaluation.

Layout (``--data_path``): ``annotations/instances_{train,val}2017.json`` and the images in
``train2017/``, ``val2017/``.

Annotations are read and validated once at start-up (``read_coco``, in a child process that hands
back the result, so that the parsing's gigabytes of Python objects leave nothing behind) and kept as
flat NumPy arrays
(``CocoAnnotations``: boxes, labels and, when masks are trained, polygons and RLE strings). No
pycocotools object and no Python object per annotation lives in a data set, so a rank and each of
its DataLoader workers hold a few arrays that reference counting and the garbage collector never
write to (a forked worker shares them with its parent). Evaluation loads the ground truth with
pycocotools on rank 0 only, when it scores, and drops it afterwards.

Training pipeline (the reference's, mmdet 2.x semantics): resize so that the long side is
``input_size * r``, r ~ U(ratio_range), keeping the aspect ratio; random crop of
``input_size x input_size`` (or the whole side when smaller) that keeps at least one box
(10 tries); drop boxes under 0.01 px; horizontal flip with p = 0.5; zero-pad to
``input_size x input_size`` after normalising. Masks are decoded at the original size and only
the crop's pixels are resized (nearest), which equals resizing the whole mask and cropping.
Test: resize to fit 1333 x 800 (long x short). Every random draw comes from the sample's seed
(imagedata.datasets.SeededSampler), so a resumed run sees exactly the same crops.

Unreadable images (missing, corrupt, not a regular file, over PIL's pixel limit, or of another
size than the annotation file says) are named once and skipped: in training the next readable
image takes the place (``meta["replaced"]`` counts it), in evaluation the image is left out of the
scoring (``meta["error"]``).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from errors import DataError
from imagedata.images import skip_sample, to_rgb8

MEAN = (0.485, 0.456, 0.406)  # mmdet's img_norm_cfg (123.675, 116.28, 103.53) / 255, RGB
STD = (0.229, 0.224, 0.225)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# Usable annotations per image beyond which the image is left out (named at start-up): the largest
# COCO image has 93; ATSS's IoU matrix and Mask R-CNN's masks grow with the count (1000 boxes at a
# 1024 crop: 87 MB of IoUs, 1 GB of uint8 masks).
MAX_ANNOTATIONS_PER_IMAGE = 1000
REPLACE_TRIES = 50  # consecutive unreadable training images before the run stops


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    root = Path(root)
    return root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"


def check_layout(root: str | Path, splits: Sequence[str]) -> None:
    """One DataError line naming everything missing from the COCO layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data_path {root} is not a folder")
    missing = []
    for split in splits:
        ann, img = coco_paths(root, split)
        if not ann.is_file():
            missing.append(str(ann.relative_to(root)))
        if not img.is_dir():
            missing.append(f"{img.relative_to(root)}/")
    if missing:
        raise DataError(f"--data_path {root} is not in COCO layout: missing {', '.join(missing)} "
                        f"(expected annotations/instances_{{split}}2017.json and {{split}}2017/)")


def load_coco(ann_file: Path):
    """pycocotools COCO, quietly (it prints progress), with a one-line error for a broken file. Only
    the scoring uses it (rank 0), never a data set."""
    from pycocotools.coco import COCO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError) as e:
        raise DataError(f"{ann_file} is not a COCO annotation file: {type(e).__name__}: {e}") from None


# ---- compact annotations ---------------------------------------------------------------------

class Ragged:
    """Rows of different lengths in one flat array: row i is ``values[start[i]:start[i + 1]]``."""

    def __init__(self, values: np.ndarray, lengths: Sequence[int]) -> None:
        self.values = values
        self.start = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(np.asarray(lengths, np.int64), out=self.start[1:])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.start[i]:self.start[i + 1]]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.start.nbytes


POLYGONS, RLE = 1, 2  # Segmentations.kind; 0: no segmentation (the box's rectangle is the mask)


@dataclass
class Segmentations:
    """Instance masks as the file gives them, one entry per usable annotation (in file order):
    ``kind`` (A,) int8; polygons: ``coords[a]`` every coordinate of annotation a (float32),
    ``parts[a]`` the length of each of its polygons; RLE: ``rle[a]`` the compressed counts (bytes)."""
    kind: np.ndarray
    coords: Ragged
    parts: Ragged
    rle: Ragged

    def mask(self, a: int, h: int, w: int, box: np.ndarray) -> np.ndarray:
        """(h, w) uint8 mask of annotation ``a`` in an image of h x w; ``box`` xyxy for kind 0."""
        from pycocotools import mask as mask_utils
        kind = int(self.kind[a])
        if kind == POLYGONS:
            coords = self.coords[a].astype(np.float64)
            cut = np.cumsum(self.parts[a])[:-1]
            rle = mask_utils.merge(mask_utils.frPyObjects(list(np.split(coords, cut)), h, w))
        elif kind == RLE:
            rle = {"size": [h, w], "counts": self.rle[a].tobytes()}
        else:  # no polygon: the box's rectangle
            m = np.zeros((h, w), np.uint8)
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
            m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
            return m
        return mask_utils.decode(rle).astype(np.uint8)

    @property
    def nbytes(self) -> int:
        return self.kind.nbytes + self.coords.nbytes + self.parts.nbytes + self.rle.nbytes


@dataclass
class CocoAnnotations:
    """One split after validation and filtering, as flat arrays; row i is the i-th image kept.

    ``ids`` (n,) image ids; ``names`` (n,) file names; ``sizes`` (n, 2) (height, width) from the
    file; annotations of row i are ``start[i]:start[i + 1]`` of ``boxes`` (A, 4) float32 xyxy in
    original pixels and ``labels`` (A,) int64 contiguous class indices; ``ann_index`` (A,) their
    entry in ``segm`` (only when masks are trained: evaluation needs no ground-truth mask here)."""
    ids: np.ndarray
    names: np.ndarray
    sizes: np.ndarray
    start: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    ann_index: np.ndarray
    segm: Optional[Segmentations]

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, i: int) -> slice:
        return slice(int(self.start[i]), int(self.start[i + 1]))

    @property
    def nbytes(self) -> int:
        arrays = (self.ids, self.names, self.sizes, self.start, self.boxes, self.labels, self.ann_index)
        return sum(a.nbytes for a in arrays) + (self.segm.nbytes if self.segm is not None else 0)


def _as_int(v) -> Optional[int]:
    """An integral JSON number as int (64.0 included); None for anything else (strings, booleans)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not (math.isfinite(v) and v == int(v)):
        return None
    return int(v)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Reader:
    """The validation of one annotation file; every problem is one DataError line naming the file."""

    def __init__(self, ann_file: Path) -> None:
        self.ann_file = ann_file

    def fail(self, msg: str):
        raise DataError(f"{self.ann_file}: {msg}")

    def load(self) -> dict:
        try:
            with open(self.ann_file, "rb") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DataError(f"{self.ann_file} is not a COCO annotation file: {type(e).__name__}: {e}") from None
        if not isinstance(data, dict):
            self.fail(f"the top level is a JSON {type(data).__name__}; a COCO annotation file is an object with "
                      f"'images', 'annotations' and 'categories'")
        for key, required in (("images", True), ("annotations", False), ("categories", False)):
            v = data.get(key)
            if v is None and required:
                self.fail(f"no '{key}' list (a COCO annotation file has 'images', 'annotations' and 'categories')")
            if v is not None and not isinstance(v, list):
                self.fail(f"'{key}' is a JSON {type(v).__name__}, expected a list")
        return data

    def categories(self, cats: list) -> dict[int, str]:
        out: dict[int, str] = {}
        for k, c in enumerate(cats):
            cid = _as_int(c.get("id")) if isinstance(c, dict) else None
            if cid is None:
                self.fail(f"categories[{k}] has no integer 'id': {c!r:.80}")
            if cid in out:
                self.fail(f"category id {cid} appears more than once in 'categories'")
            out[cid] = str(c.get("name", cid))
        return out

    def images(self, images: list, img_dir: Path) -> tuple[dict[int, int], list[str], np.ndarray]:
        """-> (row of each image id, file names, (n, 2) int32 sizes (height, width))."""
        root = os.path.normpath(os.path.abspath(img_dir))
        row_of: dict[int, int] = {}
        names: list[str] = []
        sizes = np.zeros((len(images), 2), np.int32)
        for k, im in enumerate(images):
            if not isinstance(im, dict):
                self.fail(f"images[{k}] is a JSON {type(im).__name__}, expected an object")
            iid, name = _as_int(im.get("id")), im.get("file_name")
            if iid is None:
                self.fail(f"images[{k}] has id {im.get('id')!r}; expected an integer")
            if not isinstance(name, str) or not name:
                self.fail(f"images[{k}] (id {iid}) has file_name {name!r}; expected a file in {img_dir}")
            for j, key in enumerate(("height", "width")):
                v = _as_int(im.get(key))
                if v is None or v < 1:
                    self.fail(f"images[{k}] (id {iid}, {name}) has {key} {im.get(key)!r}; expected a positive integer")
                sizes[k, j] = v
            if iid in row_of:
                first = row_of[iid]
                self.fail(f"image id {iid} appears more than once (images[{first}] {names[first]} and images[{k}] "
                          f"{name}); image ids must be unique")
            path = os.path.normpath(os.path.join(root, name))
            if os.path.isabs(name) or not path.startswith(root + os.sep):
                self.fail(f"images[{k}] (id {iid}) has file_name {name!r}, which leaves {img_dir}")
            row_of[iid] = k
            names.append(name)
        return row_of, names, sizes


def read_coco(ann_file: Path, img_dir: Path, train: bool, with_masks: bool = False,
              categories: Optional[list[int]] = None,
              max_annotations: int = MAX_ANNOTATIONS_PER_IMAGE) -> tuple[CocoAnnotations, dict]:
    """Validate ``ann_file`` and keep what the data set needs.

    Refused with one line naming the file (DataError): a file that is not a COCO object; annotations
    without a 'categories' list to name their classes (``categories`` None); an
    image entry without an integer id, a file name inside ``img_dir`` or positive integer
    width / height; duplicate image, annotation or category ids; annotations whose image is not
    listed; in the scored split (``train`` False), annotations without ``area`` and ``iscrowd``
    (and ``segmentation`` when masks are scored), which pycocotools needs.
    Skipped and counted: annotations with an invalid box (missing, non-finite, under 1 px, outside
    the image) or an unknown category; images with more than ``max_annotations`` usable
    annotations. Crowd annotations are not trained on (as mmdet); training keeps only images with a
    usable box (mmdet's filter_empty_gt).

    Returns (annotations, info) with info: ``cat_ids``, ``class_names``, ``skipped`` (counts by
    reason), ``first_skip`` (the first example of each reason), ``left_out`` (image ids and names
    left out for their annotation count), ``num_images`` in the file.
    """
    r = _Reader(ann_file)
    data = r.load()
    cat_names = r.categories(data.get("categories") or [])
    if categories is None and not cat_names and data.get("annotations"):  # every box would be skipped as unknown
        r.fail(f"no 'categories' list, so the category_id of all {len(data['annotations'])} annotations names no "
               f"class: add 'categories' (e.g. [{{\"id\": 1, \"name\": \"cat\"}}]), one entry per category_id used")
    cat_ids = sorted(cat_names) if categories is None else list(categories)
    label_of = {c: i for i, c in enumerate(cat_ids)}
    row_of, names, sizes = r.images(data["images"], img_dir)
    anns = data.get("annotations") or []

    ann_ids = np.zeros(len(anns), np.int64)
    rows: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    kept: list[dict] = []
    skipped = {"invalid box": 0, "unknown category": 0}
    first_skip: dict[str, str] = {}
    orphans, first_orphan = 0, None
    need = ("area", "iscrowd") + (("segmentation",) if with_masks else ()) if not train else ()
    for k, a in enumerate(anns):
        if not isinstance(a, dict):
            r.fail(f"annotations[{k}] is a JSON {type(a).__name__}, expected an object")
        aid, iid = _as_int(a.get("id")), _as_int(a.get("image_id"))
        if aid is None:
            r.fail(f"annotations[{k}] has id {a.get('id')!r}; expected an integer")
        ann_ids[k] = aid
        row = row_of.get(iid) if iid is not None else None
        if row is None:
            orphans += 1
            first_orphan = first_orphan or f"annotation {aid} has image_id {a.get('image_id')!r}"
            continue
        missing = [key for key in need if key not in a]
        if missing:
            r.fail(f"annotation {aid} (image {iid}) has no {' and no '.join(repr(m) for m in missing)}; pycocotools "
                   f"needs 'area' and 'iscrowd'{' and segmentation' if with_masks else ''} on every ground-truth "
                   f"annotation to score")
        h, w = int(sizes[row, 0]), int(sizes[row, 1])
        why, box = _check_annotation(a, label_of, w, h)
        if why is not None:
            skipped[why] += 1
            first_skip.setdefault(why, f"annotation {aid} of image {iid} ({names[row]}): bbox {a.get('bbox')!r}, "
                                       f"category_id {a.get('category_id')!r}")
            continue
        if a.get("iscrowd", 0):
            continue
        rows.append(row)
        boxes.append(box)
        labels.append(label_of[a["category_id"]])
        if with_masks and train:
            kept.append(a)
    uniq, counts = np.unique(ann_ids, return_counts=True)
    if len(uniq) < len(ann_ids):
        dup = int(uniq[counts > 1][0])
        r.fail(f"annotation id {dup} appears {int(counts[counts > 1][0])} times ({int((counts > 1).sum())} ids "
               f"repeated); annotation ids must be unique")
    if orphans:
        r.fail(f"{orphans} annotations refer to no image in 'images' (first: {first_orphan})")

    rows_a = np.asarray(rows, np.int64)
    image_ids = np.asarray(_ids_of(data["images"]), np.int64)
    per_image = np.bincount(rows_a, minlength=len(names))
    crowded = np.nonzero(per_image > max_annotations)[0]
    keep_image = per_image > 0 if train else np.ones(len(names), bool)
    keep_image[crowded] = False
    image_rows = np.nonzero(keep_image)[0]
    image_rows = image_rows[np.argsort(image_ids[image_rows], kind="stable")]  # ascending ids, as pycocotools
    new_row = np.full(len(names), -1, np.int64)
    new_row[image_rows] = np.arange(len(image_rows))
    ann_row = new_row[rows_a]
    valid = ann_row >= 0
    order = np.nonzero(valid)[0][np.argsort(ann_row[valid], kind="stable")]  # file order within each image
    start = np.zeros(len(image_rows) + 1, np.int64)
    np.cumsum(np.bincount(ann_row[valid], minlength=len(image_rows)), out=start[1:])
    out = CocoAnnotations(
        ids=image_ids[image_rows], names=np.asarray([names[i] for i in image_rows], dtype=str).reshape(-1),
        sizes=sizes[image_rows].copy(), start=start,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4)[order], labels=np.asarray(labels, np.int64)[order],
        ann_index=order if with_masks and train else np.zeros(0, np.int64),
        segm=_segmentations(kept, sizes[rows_a]) if with_masks and train else None)
    info = {"cat_ids": cat_ids, "class_names": [cat_names.get(c, str(c)) for c in cat_ids], "skipped": skipped,
            "first_skip": first_skip, "num_images": len(names),
            "left_out": [(int(image_ids[i]), names[i], int(per_image[i])) for i in crowded]}
    return out, info


def _read_in_child(send, args: tuple) -> None:
    try:
        send.send(("ok", read_coco(*args)))
    except DataError as e:
        send.send(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 (reported by the parent)
        send.send(("crash", f"{type(e).__name__}: {e}"))
    finally:
        send.close()


def read_coco_apart(*args) -> tuple[CocoAnnotations, dict]:
    """``read_coco`` in a forked child process that hands back the arrays and exits. Parsing COCO
    train2017 builds about 3.5 GB of Python objects; a process that parsed it itself keeps about
    340 MB of their freed memory (heap fragmentation) for the rest of the run, in every rank."""
    if "fork" not in mp.get_all_start_methods():
        return read_coco(*args)
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_read_in_child, args=(send, args), daemon=True)
    child.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:
        child.join()
        raise DataError(f"{args[0]}: the process reading it ended with exit code {child.exitcode} "
                        f"(out of memory?)") from None
    finally:
        recv.close()
    child.join()
    if status == "error":
        raise DataError(payload)
    if status == "crash":
        raise RuntimeError(f"reading {args[0]}: {payload}")
    return payload


def _ids_of(images: list) -> list[int]:
    return [_as_int(im["id"]) for im in images]


def _check_annotation(a: dict, label_of: dict, w: int, h: int):
    """(None, xyxy box) for a usable annotation, else (reason, None)."""
    cat = a.get("category_id")
    if isinstance(cat, bool) or cat not in label_of:
        return "unknown category", None
    box = a.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_number(v) for v in box):
        return "invalid box", None
    x, y, bw, bh = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw < 1 or bh < 1:
        return "invalid box", None  # mmdet's CocoDataset drops boxes under 1 px as well
    if x + bw <= 0 or y + bh <= 0 or x >= w or y >= h:
        return "invalid box", None
    return None, (x, y, x + bw, y + bh)


def _segmentations(anns: list[dict], sizes: np.ndarray, strict: bool = False) -> Segmentations:
    """The usable annotations' masks in compact form (``sizes``: each one's image (h, w)). Polygons
    with fewer than 3 points are dropped (as mmdet); so are polygons holding something else than
    numbers, which the fast path finds and the strict one (``strict``) removes."""
    from pycocotools import mask as mask_utils
    kind = np.zeros(len(anns), np.int8)
    coords: list[float] = []
    n_coords, parts, n_parts, rle, n_rle = [], [], [], [], []
    for k, a in enumerate(anns):
        seg = a.get("segmentation")
        nc = npart = nr = 0
        if isinstance(seg, list):
            polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                     and (not strict or all(_number(v) for v in p))]
            if polys:
                kind[k] = POLYGONS
                for p in polys:
                    coords.extend(p)
                    parts.append(len(p))
                nc, npart = sum(len(p) for p in polys), len(polys)
        elif isinstance(seg, dict) and "counts" in seg:
            h, w = int(sizes[k, 0]), int(sizes[k, 1])
            counts = seg["counts"]
            if isinstance(counts, list):  # uncompressed RLE: compressed once here
                counts = mask_utils.frPyObjects(seg, h, w)["counts"]
            data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
            kind[k] = RLE
            rle.append(np.frombuffer(data, np.uint8))
            nr = len(data)
        n_coords.append(nc)
        n_parts.append(npart)
        n_rle.append(nr)
    try:
        values = np.asarray(coords, np.float32)
    except (TypeError, ValueError):
        if strict:
            raise
        return _segmentations(anns, sizes, strict=True)
    return Segmentations(kind, Ragged(values, n_coords), Ragged(np.asarray(parts, np.int32), n_parts),
                         Ragged(np.concatenate(rle) if rle else np.zeros(0, np.uint8), n_rle))


# ---- the data set ------------------------------------------------------------------------------

def nearest_index(out_size: int, in_size: int, start: int, length: int) -> np.ndarray:
    """Source rows (or columns) of output ``start:start + length`` of a nearest-neighbour resize
    from ``in_size`` to ``out_size``, exactly as torch's ``interpolate(mode="nearest")`` picks them."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(start, start + length, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


class CocoDetection(Dataset):
    """Items: (image (3, H, W) normalised float, target, meta).

    target: ``boxes`` (G, 4) xyxy in the transformed image, ``labels`` (G,) contiguous class
    indices (categories sorted by id), ``masks`` (G, H, W) uint8 when ``with_masks`` (training).
    meta: ``image_id``, ``orig_size`` (h, w), ``size`` (h, w) of the content, ``scale``, and
    ``replaced`` (training: 1 when this item stands in for an unreadable image) or ``error`` (evaluation:
    why the image could not be read; the image is then empty).
    Skipped annotations are counted (``skipped``, ``skipped_summary()``).
    """

    def __init__(self, root: str | Path, split: str, train: bool, input_size: int = 1024,
                 ratio_range: tuple[float, float] = (0.1, 2.0), test_size: tuple[int, int] = (1333, 800),
                 with_masks: bool = False, categories: Optional[list[int]] = None,
                 max_annotations: int = MAX_ANNOTATIONS_PER_IMAGE) -> None:
        self.ann_file, self.img_dir = coco_paths(root, split)
        self.train, self.input_size, self.ratio_range = train, input_size, tuple(ratio_range)
        self.test_size, self.with_masks = tuple(test_size), with_masks
        self.annotations, info = read_coco_apart(self.ann_file, self.img_dir, train, with_masks, categories,
                                                 max_annotations)
        self.cat_ids, self.class_names = info["cat_ids"], info["class_names"]
        self.skipped, self._first_skip, self.left_out = info["skipped"], info["first_skip"], info["left_out"]
        self.max_annotations = max_annotations
        self.ids = self.annotations.ids  # image ids, in item order
        self._warned: set[str] = set()

    def skipped_summary(self) -> str:
        """What start-up left out, in one or two lines (empty when nothing)."""
        lines = []
        if any(self.skipped.values()):
            parts = [f"{n} with {why} (first: {self._first_skip[why]})" for why, n in self.skipped.items() if n]
            lines.append(f"{self.img_dir.name}: skipped {sum(self.skipped.values())} annotations: " + "; ".join(parts))
        if self.left_out:
            iid, name, n = self.left_out[0]
            lines.append(f"{self.img_dir.name}: left out {len(self.left_out)} images with more than "
                         f"{self.max_annotations} usable annotations (first: image {iid} ({name}), {n})")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.annotations)

    def image_path(self, i: int) -> Path:
        return self.img_dir / str(self.annotations.names[i])

    def _load_image(self, i: int) -> Image.Image:
        """The RGB image of row i; DataError with the reason (the caller names the file) when it cannot be used."""
        path = self.image_path(i)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
                raise DataError("not a regular file")
            with Image.open(path) as im:
                img = to_rgb8(im)  # 16-bit images scaled, not clipped to white
        except Exception as e:  # missing, corrupt, over PIL's pixel limit, ...
            raise DataError(f"{type(e).__name__}: {e}") from None
        h, w = (int(v) for v in self.annotations.sizes[i])
        if img.size != (w, h):
            raise DataError(f"the image is {img.size[0]}x{img.size[1]} but {self.ann_file.name} says {w}x{h}")
        return img

    def _warn(self, i: int, err: Exception) -> None:
        skip_sample(str(self.image_path(i)), str(err), self._warned)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        if not self.train:
            try:
                return self._item(index, self._load_image(index), seed)
            except DataError as e:
                self._warn(index, e)
                meta = {"image_id": int(self.ids[index]), "error": str(e), "orig_size": (0, 0), "size": (0, 0),
                        "scale": (1.0, 1.0)}
                return torch.zeros(3, 0, 0), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}, meta
        n = len(self)
        for attempt in range(min(n, REPLACE_TRIES)):
            i = (index + attempt) % n
            try:
                img = self._load_image(i)
            except DataError as e:
                self._warn(i, e)
                continue
            x, target, meta = self._item(i, img, seed)
            meta["replaced"] = int(attempt > 0)  # the requested image was unreadable (counted once per epoch)
            return x, target, meta
        raise DataError(f"none of {min(n, REPLACE_TRIES)} consecutive images starting at {self.image_path(index)} "
                        f"could be read")

    def _item(self, i: int, img: Image.Image, seed: int):
        ann = self.annotations
        sl = ann.rows(i)
        w0, h0 = img.size
        boxes = torch.from_numpy(ann.boxes[sl].copy())
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
        labels = torch.from_numpy(ann.labels[sl].copy())
        rng = random.Random(seed)
        if self.train:
            scale = self.input_size * rng.uniform(*self.ratio_range) / max(h0, w0)
        else:
            long_, short = max(self.test_size), min(self.test_size)
            scale = min(long_ / max(h0, w0), short / min(h0, w0))
        nw, nh = max(int(w0 * scale + 0.5), 1), max(int(h0 * scale + 0.5), 1)
        pixels = np.asarray(img.resize((nw, nh), Image.BILINEAR))
        sx, sy = nw / w0, nh / h0
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        keep = torch.ones(len(boxes), dtype=torch.bool)
        oy = ox = 0
        ch, cw = nh, nw
        flip = False
        if self.train:
            oy, ox, ch, cw, boxes, keep = self._crop(boxes, nh, nw, rng)
            labels = labels[keep]
            pixels = pixels[oy:oy + ch, ox:ox + cw]
            flip = rng.random() < 0.5
        x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1) / 255.0
        masks = None
        if self.with_masks and self.train:
            masks = self._masks(i, keep, (h0, w0), (nh, nw), (oy, ox, ch, cw))
        if flip:
            x = x.flip(-1)
            boxes = torch.stack([cw - boxes[:, 2], boxes[:, 1], cw - boxes[:, 0], boxes[:, 3]], dim=1)
            if masks is not None:
                masks = masks.flip(-1)
        x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        target = {"boxes": boxes, "labels": labels}
        if masks is not None:
            target["masks"] = masks.contiguous()
        meta = {"image_id": int(self.ids[i]), "orig_size": (h0, w0), "size": tuple(x.shape[-2:]), "scale": (sy, sx)}
        if self.train:  # pad to the fixed training size (mmdet's Pad size=(1024, 1024))
            s = self.input_size
            x = F.pad(x, (0, s - x.shape[2], 0, s - x.shape[1]))
        return x.contiguous(), target, meta

    def _crop(self, boxes: Tensor, h: int, w: int, rng: random.Random):
        """A crop of at most input_size that keeps a box (10 tries): (oy, ox, ch, cw, boxes, keep)."""
        ch, cw = min(self.input_size, h), min(self.input_size, w)
        for _ in range(10):
            oy, ox = rng.randint(0, h - ch), rng.randint(0, w - cw)
            b = boxes - torch.tensor([ox, oy, ox, oy], dtype=boxes.dtype)
            b[:, 0::2] = b[:, 0::2].clamp(0, cw)
            b[:, 1::2] = b[:, 1::2].clamp(0, ch)
            keep = ((b[:, 2] - b[:, 0]) > 1e-2) & ((b[:, 3] - b[:, 1]) > 1e-2)
            if keep.any() or len(boxes) == 0:
                break
        return oy, ox, ch, cw, b[keep], keep

    def _masks(self, i: int, keep: Tensor, orig: tuple[int, int], resized: tuple[int, int],
               crop: tuple[int, int, int, int]) -> Tensor:
        """(G, ch, cw) uint8: the kept annotations' masks, decoded at the original size, then only the
        crop's pixels taken by nearest neighbour (equal to resizing the whole mask and cropping)."""
        ann = self.annotations
        (h0, w0), (nh, nw), (oy, ox, ch, cw) = orig, resized, crop
        rows = np.nonzero(keep.numpy())[0] + ann.rows(i).start
        ys, xs = nearest_index(nh, h0, oy, ch), nearest_index(nw, w0, ox, cw)
        out = np.zeros((len(rows), ch, cw), np.uint8)
        for k, r in enumerate(rows):
            full = ann.segm.mask(int(ann.ann_index[r]), h0, w0, ann.boxes[r])
            out[k] = full[ys][:, xs]
        return torch.from_numpy(out)


def collate(batch, size_divisor: int = 32):
    """Zero-pad the images to one (N, 3, H, W) batch, H and W multiples of ``size_divisor``."""
    imgs, targets, metas = zip(*batch)
    h = -(-max(i.shape[1] for i in imgs) // size_divisor) * size_divisor
    w = -(-max(i.shape[2] for i in imgs) // size_divisor) * size_divisor
    out = imgs[0].new_zeros(len(imgs), 3, h, w)
    for o, i in zip(out, imgs):
        o[:, :i.shape[1], :i.shape[2]] = i
    return out, list(targets), list(metas)


# ---- results -----------------------------------------------------------------------------------

def paste_masks(probs: Tensor, boxes: Tensor, size: tuple[int, int], threshold: float = 0.5
                ) -> list[tuple[int, int, np.ndarray]]:
    """Instance masks in their boxes -> binary masks in an image of ``size`` (H, W), as mmdet's
    ``_do_paste_mask``: each pixel centre inside a box's surroundings samples the box's mask
    bilinearly (grid_sample, zeros outside), then ``>= threshold``.

    probs: (M, [1,] m, m) probabilities on any device; boxes: (M, 4) xyxy in the image's pixels.
    Only the pixels within a box (plus one) are computed, on the masks' device; the binary regions
    come to the CPU in one transfer. Returns per mask (y0, x0, region (h, w) bool numpy)."""
    if len(probs) == 0:
        return []
    H, W = size
    probs = probs.reshape(len(probs), 1, *probs.shape[-2:]).float()
    device = probs.device
    out, flat, shapes = [], [], []
    for k, (bx0, by0, bx1, by1) in enumerate(boxes.float().cpu().tolist()):  # one small transfer
        x0, y0 = max(math.floor(bx0) - 1, 0), max(math.floor(by0) - 1, 0)
        x1, y1 = min(math.ceil(bx1) + 1, W), min(math.ceil(by1) + 1, H)
        hh, ww = max(y1 - y0, 0), max(x1 - x0, 0)
        shapes.append((y0, x0, hh, ww))
        if hh == 0 or ww == 0:
            continue
        sx, sy = 2 / max(bx1 - bx0, 1e-6), 2 / max(by1 - by0, 1e-6)
        gx = torch.arange(x0, x1, device=device, dtype=torch.float32).add_(0.5 - bx0).mul_(sx).sub_(1)
        gy = torch.arange(y0, y1, device=device, dtype=torch.float32).add_(0.5 - by0).mul_(sy).sub_(1)
        grid = torch.stack([gx.expand(hh, ww), gy[:, None].expand(hh, ww)], dim=-1)[None]
        region = F.grid_sample(probs[k:k + 1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        flat.append(region.reshape(-1) >= threshold)
    host = torch.cat(flat).cpu().numpy() if flat else np.zeros(0, bool)
    pos = 0
    for y0, x0, hh, ww in shapes:
        out.append((y0, x0, host[pos:pos + hh * ww].reshape(hh, ww)))
        pos += hh * ww
    return out


def region_rle(region: np.ndarray, y0: int, x0: int, size: tuple[int, int]) -> dict:
    """COCO's compressed RLE of an (H, W) mask that is zero outside ``region`` placed at (y0, x0):
    equal to ``pycocotools.mask.encode`` of the whole mask, at the cost of the region only."""
    from pycocotools import mask as mask_utils
    H, W = size
    h, w = region.shape
    cols = np.zeros((w, h + 2), np.int8)  # the region's columns (COCO runs are column-major), zero-padded
    cols[:, 1:-1] = region.T
    d = np.diff(cols, axis=1).ravel()  # +1: a run starts at this row of the column, -1: it ended
    at = np.flatnonzero(d)
    c, r = np.divmod(at, h + 1)
    pos = (x0 + c) * H + (y0 + r)
    rising = d[at] > 0
    starts, ends = pos[rising], pos[~rising]
    if len(starts) > 1:  # a run reaching the image's bottom continues at the top of the next column
        joined = ends[:-1] == starts[1:]
        if joined.any():
            starts = starts[np.concatenate([[True], ~joined])]
            ends = ends[np.concatenate([~joined, [True]])]
    edges = np.empty(2 * len(starts) + 2, np.int64)
    edges[0], edges[-1] = 0, H * W
    edges[1:-1:2], edges[2:-1:2] = starts, ends
    counts = np.diff(edges)
    if len(counts) > 1 and counts[-1] == 0:  # a mask ending on its last pixel has no trailing zeros
        counts = counts[:-1]
    rle = mask_utils.frPyObjects({"size": [H, W], "counts": counts.tolist()}, H, W)
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def to_coco_results(det: dict, meta: dict, cat_ids: Sequence[int], with_masks: bool) -> list[dict]:
    """One image's detections (input-pixel boxes; Mask R-CNN: ``masks`` (M, 1, m, m) in the boxes)
    -> COCO result dicts in original pixels; masks pasted at the original size on their device."""
    sy, sx = meta["scale"]
    h0, w0 = meta["orig_size"]
    boxes = det["boxes"].float() / torch.tensor([sx, sy, sx, sy], device=det["boxes"].device)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
    rles = None
    if with_masks and "masks" in det and len(boxes):
        rles = [region_rle(reg, y0, x0, (h0, w0)) for y0, x0, reg in paste_masks(det["masks"], boxes, (h0, w0))]
    out = []
    for k, (b, s, l) in enumerate(zip(boxes.cpu().tolist(), det["scores"].float().cpu().tolist(),
                                      det["labels"].cpu().tolist())):
        r = {"image_id": int(meta["image_id"]), "category_id": int(cat_ids[l]),
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
        if rles is not None:
            r["segmentation"] = rles[k]
        out.append(r)
    return out


def coco_evaluate(coco_gt, results: list[dict], iou_types: Sequence[str], img_ids: Optional[Sequence[int]] = None,
                  use_cats: bool = True) -> dict[str, dict[str, float]]:
    """pycocotools COCOeval: {iou_type: {AP, AP50, ..., ARl}} (the 12 standard numbers, 0..1;
    -1 where a category of area has no ground truth). No detections: every number 0.
    ``use_cats=False``: class-agnostic scoring (COCOeval's useCats=0; a box matches any object)."""
    from pycocotools.cocoeval import COCOeval
    out = {}
    for iou_type in iou_types:
        # copies: loadRes adds fields (a bbox result gets a box polygon as "segmentation")
        rs = [dict(r) for r in results if iou_type == "bbox" or "segmentation" in r]
        if not rs:
            out[iou_type] = {k: 0.0 for k in STAT_NAMES}
            continue
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dt = coco_gt.loadRes(rs)
            ev = COCOeval(coco_gt, dt, iou_type)
            if img_ids is not None:
                ev.params.imgIds = list(img_ids)
            ev.params.useCats = int(use_cats)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
    return out
