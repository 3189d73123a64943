"""Confusion-matrix segmentation metrics: mIoU, mAcc, aAcc and per-class IoU / accuracy.

Definitions as mmseg's ``eval_metrics`` (and the ADE20K benchmark): counts are summed over the
whole evaluation set first, then per class IoU = TP / (TP + FP + FN) and Acc = TP / (TP + FN);
a class with no pixel in the labels *and* none predicted (union 0) has IoU NaN and is left out of
the mean; a class absent from the labels but predicted has IoU 0 and counts. aAcc = all correct
pixels / all labelled pixels. Ignored pixels (``ignore_index``) count nowhere.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """pred, label: integer tensors of one shape -> (num_classes, num_classes) int64 counts,
    rows = true class, columns = predicted class."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    valid = label != ignore_index
    lab = label[valid].long()
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        raise ValueError(f"label values outside 0..{num_classes - 1} (and ignore {ignore_index}): "
                         f"{int(lab.min())}..{int(lab.max())}")
    idx = lab * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def segmentation_metrics(cm: Tensor, class_names: Optional[Sequence[str]] = None) -> dict:
    """Metrics from a summed confusion matrix; fractions in [0, 1] (papers print them x100).

    Returns {"mIoU", "mAcc", "aAcc", "per_class": {name: {"IoU", "Acc", "pixels"}}, "pixels"};
    NaN (a class neither labelled nor predicted) is written as None so the dict is valid JSON.
    """
    cm = cm.double().cpu()
    tp = cm.diag()
    label_area = cm.sum(1)
    pred_area = cm.sum(0)
    union = label_area + pred_area - tp
    iou = [float(t / u) if u > 0 else float("nan") for t, u in zip(tp, union)]
    acc = [float(t / l) if l > 0 else float("nan") for t, l in zip(tp, label_area)]
    total = float(label_area.sum())
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    none = lambda v: None if math.isnan(v) else v
    return {
        "mIoU": none(_nanmean(iou)), "mAcc": none(_nanmean(acc)),
        "aAcc": float(tp.sum() / total) if total > 0 else None,
        "pixels": int(total),
        "per_class": {n: {"IoU": none(i), "Acc": none(a), "pixels": int(l)}
                      for n, i, a, l in zip(names, iou, acc, label_area)},
    }


# ADE20K SceneParsing (ADEChallengeData2016, objectInfo150): the first name of each of the 150
# classes, in label order 1..150 (label 0, "other", is ignored).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150


def class_names_for(num_classes: int) -> list[str]:
    return list(ADE20K_CLASSES) if num_classes == 150 else [f"class_{i}" for i in range(num_classes)]
