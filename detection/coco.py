"""COCO-layout detection data, the reference's pipelines, and pycocotools evaluation.

Layout (``--data_path``): ``annotations/instances_{train,val}2017.json`` and the images in
``train2017/``, ``val2017/``.

Training pipeline (the reference's, mmdet 2.x semantics): resize so that the long side is
``input_size * r``, r ~ U(ratio_range), keeping the aspect ratio; random crop of
``input_size x input_size`` (or the whole side when smaller) that keeps at least one box
(10 tries); drop boxes under 0.01 px; horizontal flip with p = 0.5; zero-pad to
``input_size x input_size`` after normalising. Test: resize to fit 1333 x 800 (long x short).
Every random draw comes from the sample's seed (imagedata.datasets.SeededSampler), so a resumed
run sees exactly the same crops.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import random
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from errors import DataError

MEAN = (0.485, 0.456, 0.406)  # mmdet's img_norm_cfg (123.675, 116.28, 103.53) / 255, RGB
STD = (0.229, 0.224, 0.225)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


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
    """pycocotools COCO, quietly (it prints progress), with a one-line error for a broken file."""
    from pycocotools.coco import COCO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{ann_file} is not a COCO annotation file: {type(e).__name__}: {e}") from None


class CocoDetection(Dataset):
    """Items: (image (3, H, W) normalised float, target, meta).

    target: ``boxes`` (G, 4) xyxy in the transformed image, ``labels`` (G,) contiguous class
    indices (categories sorted by id), ``masks`` (G, H, W) uint8 when ``with_masks``.
    meta: ``image_id``, ``orig_size`` (h, w), ``size`` (h, w) of the content, ``scale``.
    Annotations with an invalid box or an unknown category are skipped and counted
    (``self.skipped``, ``skipped_summary()``); crowd boxes are not trained on (as mmdet).
    Training drops images without a usable box (mmdet's filter_empty_gt).
    """

    def __init__(self, root: str | Path, split: str, train: bool, input_size: int = 1024,
                 ratio_range: tuple[float, float] = (0.1, 2.0), test_size: tuple[int, int] = (1333, 800),
                 with_masks: bool = False, categories: Optional[list[int]] = None) -> None:
        ann_file, self.img_dir = coco_paths(root, split)
        self.coco = load_coco(ann_file)
        self.train, self.input_size, self.ratio_range = train, input_size, tuple(ratio_range)
        self.test_size, self.with_masks = tuple(test_size), with_masks
        self.cat_ids = sorted(self.coco.getCatIds()) if categories is None else list(categories)
        self.label_of = {c: i for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] if c in self.coco.cats else str(c) for c in self.cat_ids]
        self.skipped = {"invalid box": 0, "unknown category": 0}
        self._first_skip: dict[str, str] = {}
        self.anns: dict[int, list[dict]] = {}
        for img_id in sorted(self.coco.imgs):
            info = self.coco.imgs[img_id]
            keep = []
            for a in self.coco.imgToAnns.get(img_id, []):
                why = self._invalid(a, info)
                if why is not None:
                    self.skipped[why] += 1
                    self._first_skip.setdefault(why, f"annotation {a.get('id')} of image {img_id} "
                                                     f"({info.get('file_name')}): bbox {a.get('bbox')}, "
                                                     f"category_id {a.get('category_id')}")
                    continue
                if not a.get("iscrowd", 0):
                    keep.append(a)
            self.anns[img_id] = keep
        ids = sorted(self.coco.imgs)
        self.ids = [i for i in ids if self.anns[i]] if train else ids

    def _invalid(self, a: dict, info: dict) -> Optional[str]:
        if a.get("category_id") not in self.label_of:
            return "unknown category"
        box = a.get("bbox")
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            return "invalid box"
        try:
            x, y, w, h = (float(v) for v in box)
        except (TypeError, ValueError):
            return "invalid box"
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 1 or h < 1:
            return "invalid box"  # mmdet's CocoDataset drops boxes under 1 px as well
        W, H = info.get("width", math.inf), info.get("height", math.inf)
        if x + w <= 0 or y + h <= 0 or x >= W or y >= H:
            return "invalid box"
        return None

    def skipped_summary(self) -> str:
        if not any(self.skipped.values()):
            return ""
        parts = [f"{n} with {why} (first: {self._first_skip[why]})" for why, n in self.skipped.items() if n]
        return f"{self.img_dir.name}: skipped {sum(self.skipped.values())} annotations: " + "; ".join(parts)

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, img_id: int):
        info = self.coco.imgs[img_id]
        path = self.img_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        anns = self.anns[img_id]
        w, h = img.size
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.long)
        masks = None
        if self.with_masks:
            masks = torch.from_numpy(np.stack([self._mask(a, h, w) for a in anns]) if anns
                                     else np.zeros((0, h, w), np.uint8))
        return img, boxes, labels, masks

    def _mask(self, a: dict, h: int, w: int) -> np.ndarray:
        from pycocotools import mask as mask_utils
        seg = a.get("segmentation")
        if not seg:  # a box without polygon: its rectangle
            m = np.zeros((h, w), np.uint8)
            x, y, bw, bh = (int(round(v)) for v in a["bbox"])
            m[max(y, 0):y + bh, max(x, 0):x + bw] = 1
            return m
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return mask_utils.decode(rle).astype(np.uint8)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        img_id = self.ids[index]
        img, boxes, labels, masks = self._load(img_id)
        w0, h0 = img.size
        rng = random.Random(seed)
        if self.train:
            scale = self.input_size * rng.uniform(*self.ratio_range) / max(h0, w0)
        else:
            long_, short = max(self.test_size), min(self.test_size)
            scale = min(long_ / max(h0, w0), short / min(h0, w0))
        nw, nh = max(int(w0 * scale + 0.5), 1), max(int(h0 * scale + 0.5), 1)
        img = img.resize((nw, nh), Image.BILINEAR)
        sx, sy = nw / w0, nh / h0
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        if masks is not None and len(masks):
            masks = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
        elif masks is not None:
            masks = torch.zeros(0, nh, nw, dtype=torch.uint8)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        if self.train:
            x, boxes, labels, masks = self._crop_flip(x, boxes, labels, masks, rng)
        x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        target = {"boxes": boxes, "labels": labels}
        if masks is not None:
            target["masks"] = masks
        meta = {"image_id": img_id, "orig_size": (h0, w0), "size": tuple(x.shape[-2:]), "scale": (sy, sx)}
        if self.train:  # pad to the fixed training size (mmdet's Pad size=(1024, 1024))
            s = self.input_size
            x = F.pad(x, (0, s - x.shape[2], 0, s - x.shape[1]))
        return x, target, meta

    def _crop_flip(self, x: Tensor, boxes: Tensor, labels: Tensor, masks: Optional[Tensor], rng: random.Random):
        _, h, w = x.shape
        ch, cw = min(self.input_size, h), min(self.input_size, w)
        for _ in range(10):
            oy, ox = rng.randint(0, h - ch), rng.randint(0, w - cw)
            b = boxes - torch.tensor([ox, oy, ox, oy], dtype=boxes.dtype)
            b[:, 0::2] = b[:, 0::2].clamp(0, cw)
            b[:, 1::2] = b[:, 1::2].clamp(0, ch)
            keep = ((b[:, 2] - b[:, 0]) > 1e-2) & ((b[:, 3] - b[:, 1]) > 1e-2)
            if keep.any() or len(boxes) == 0:
                break
        x = x[:, oy:oy + ch, ox:ox + cw]
        boxes, labels = b[keep], labels[keep]
        if masks is not None:
            masks = masks[keep][:, oy:oy + ch, ox:ox + cw]
        if rng.random() < 0.5:
            x = x.flip(-1)
            boxes = torch.stack([cw - boxes[:, 2], boxes[:, 1], cw - boxes[:, 0], boxes[:, 3]], dim=1)
            if masks is not None:
                masks = masks.flip(-1)
        return x.contiguous(), boxes, labels, masks.contiguous() if masks is not None else None


def collate(batch, size_divisor: int = 32):
    """Zero-pad the images to one (N, 3, H, W) batch, H and W multiples of ``size_divisor``."""
    imgs, targets, metas = zip(*batch)
    h = -(-max(i.shape[1] for i in imgs) // size_divisor) * size_divisor
    w = -(-max(i.shape[2] for i in imgs) // size_divisor) * size_divisor
    out = imgs[0].new_zeros(len(imgs), 3, h, w)
    for o, i in zip(out, imgs):
        o[:, :i.shape[1], :i.shape[2]] = i
    return out, list(targets), list(metas)


def to_coco_results(det: dict, meta: dict, cat_ids: Sequence[int], with_masks: bool) -> list[dict]:
    """One image's detections (input-pixel boxes) -> COCO result dicts in original pixels."""
    sy, sx = meta["scale"]
    h0, w0 = meta["orig_size"]
    boxes = det["boxes"].float().cpu() / torch.tensor([sx, sy, sx, sy])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
    out = []
    rles = None
    if with_masks and "masks" in det and len(boxes):
        from pycocotools import mask as mask_utils
        h, w = meta["size"]
        m = det["masks"][:, :h, :w].float().cpu()
        m = F.interpolate(m[None], size=(h0, w0), mode="bilinear", align_corners=False)[0] >= 0.5
        rles = mask_utils.encode(np.asfortranarray(m.permute(1, 2, 0).numpy().astype(np.uint8)))
    for k, (b, s, l) in enumerate(zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist())):
        r = {"image_id": int(meta["image_id"]), "category_id": int(cat_ids[l]),
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
        if rles is not None:
            rle = rles[k]
            r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        out.append(r)
    return out


def coco_evaluate(coco_gt, results: list[dict], iou_types: Sequence[str], img_ids: Optional[Sequence[int]] = None
                  ) -> dict[str, dict[str, float]]:
    """pycocotools COCOeval: {iou_type: {AP, AP50, ..., ARl}} (the 12 standard numbers, 0..1;
    -1 where a category of area has no ground truth). No detections: every number 0."""
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
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
    return out
