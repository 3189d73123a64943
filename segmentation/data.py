"""ADE20K-layout segmentation data and the reference's pipelines (mmseg's ADE20K configs).

Layout (ADEChallengeData2016)::

    data_path/images/training/*.jpg        data_path/annotations/training/*.png
    data_path/images/validation/*.jpg      data_path/annotations/validation/*.png

An image and its annotation share a file stem. Annotations are single-channel label maps;
with ``reduce_zero_label`` (ADE20K) label 0 ("other") becomes 255 (ignored) and every other
label is reduced by one, so the 150 classes are 0..149.

Training pipeline (``TrainTransform``; its defaults are mmseg's, listed in SEGMENTATION.md), per
sample, all random draws from one generator seeded by (seed, pass, index) so that any number of
workers and a resumed run give the same crops:
  1. resize keeping the ratio into ``scale`` x r, r ~ U(``ratio_range``) (mmcv ``rescale``: the
     long side <= max(scale) r and the short side <= min(scale) r); bilinear image, nearest labels;
  2. random ``crop`` x ``crop`` window, redrawn up to 10 times until no class covers
     >= ``cat_max_ratio`` of the labelled pixels of the crop and more than one class is present;
  3. horizontal flip with probability ``flip_prob``;
  4. photometric distortion (``photometric_distortion``): brightness, then contrast either first
     or last (coin), saturation, hue, each applied with probability 0.5;
  5. ImageNet normalisation; pad to ``crop`` x ``crop`` (image 0, labels 255, the ignore index).
Evaluation (``test_resize``): resize keeping the ratio into ``scale``; labels stay at the original size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from errors import DataError
from imagedata.images import IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, skip_sample, to_rgb8

from .heads import IGNORE_INDEX

SPLITS = {"train": "training", "val": "validation"}
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


@dataclass
class Pairs:
    """The matched (image, annotation) files of a split and what was left out."""
    samples: list[tuple[str, str]]
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.samples)


def _files(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in exts}


def _missing_folders(root: Path, splits: Sequence[str]) -> list[str]:
    return [f"{kind}/{SPLITS[split]}/" for split in splits for kind in ("images", "annotations")
            if not (root / kind / SPLITS[split]).is_dir()]


def layout_problem(root: Path, splits: Sequence[str]) -> str:
    """The line for a --data_path without the ADE20K folders of ``splits`` (train, val): every missing
    one, and the subfolder that has the layout when there is exactly one (the folder above
    ADEChallengeData2016/); '' when none is missing."""
    missing = _missing_folders(root, splits)
    if not missing:
        return ""
    line = (f"--data_path {root} is not in ADE20K layout: missing {', '.join(missing[:-1])}"
            f"{' and ' if len(missing) > 1 else ''}{missing[-1]} (expected images/{{training,validation}}/*.jpg "
            f"and annotations/{{training,validation}}/*.png)")
    inside = [d for d in sorted(root.iterdir()) if not d.name.startswith(".")
              and (d / "images").is_dir() and (d / "annotations").is_dir()]
    if len(inside) == 1:
        line += f"; {inside[0].name}/ has it: use --data_path {inside[0]}"
    return line


def find_pairs(data_path: str, split: str, check_sizes: bool = True, needs: Sequence[str] = tuple(SPLITS)) -> Pairs:
    """Pair ``images/<split>`` with ``annotations/<split>`` by file stem.

    A missing folder raises DataError naming it with every missing folder of the splits the run
    ``needs`` (one line). An image without annotation, an
    annotation without image, or a pair whose sizes differ is named in ``skipped`` and left out.
    """
    root = Path(data_path)
    sub = SPLITS[split]
    if not root.is_dir():
        raise DataError(f"--data_path {root} does not exist or is not a folder")
    if _missing_folders(root, [split]):
        raise DataError(layout_problem(root, sorted({split, *needs})))
    images = _files(root / "images" / sub, IMG_EXTENSIONS)
    labels = _files(root / "annotations" / sub, (".png",))
    skipped = [f"{images[s]}: no annotation {s}.png" for s in sorted(images.keys() - labels.keys())]
    skipped += [f"{labels[s]}: no image" for s in sorted(labels.keys() - images.keys())]
    samples = []
    for stem in sorted(images.keys() & labels.keys()):
        img, ann = images[stem], labels[stem]
        if check_sizes:
            try:
                with Image.open(img) as a, Image.open(ann) as b:
                    size_img, size_ann = a.size, b.size
            except Exception as e:  # unreadable header: named, skipped
                skipped.append(f"{img}: unreadable ({type(e).__name__}: {e})")
                continue
            if size_img != size_ann:
                skipped.append(f"{img}: image {size_img[0]}x{size_img[1]} but annotation "
                               f"{size_ann[0]}x{size_ann[1]}")
                continue
        samples.append((str(img), str(ann)))
    if not samples:
        raise DataError(f"--data_path {root}: no image/annotation pairs in images/{sub}/ and annotations/{sub}/"
                        + (f" ({len(skipped)} files unmatched, e.g. {skipped[0]})" if skipped else ""))
    return Pairs(samples, skipped)


def load_pair(img_path: str, ann_path: str, reduce_zero_label: bool, num_classes: Optional[int] = None
              ) -> tuple[Tensor, Tensor]:
    """-> image (3, H, W) uint8 (16-bit images scaled to 8 bits), labels (H, W) int64 (255 = ignore).
    DataError naming the file for a label map that is not single-channel, of another size than its
    image, or (given ``num_classes``) holding a class outside 0..num_classes - 1."""
    with Image.open(img_path) as im:
        img = torch.from_numpy(np.array(to_rgb8(im))).permute(2, 0, 1).contiguous()
    with Image.open(ann_path) as an:
        ann = np.array(an)
    if ann.ndim != 2:
        raise DataError(f"{ann_path} is not a single-channel label map (shape {ann.shape})")
    label = torch.from_numpy(ann.astype(np.int64))
    if label.shape != img.shape[1:]:
        raise DataError(f"{ann_path} is {label.shape[1]}x{label.shape[0]} but its image is "
                        f"{img.shape[2]}x{img.shape[1]}")
    if reduce_zero_label:
        label = torch.where(label == 0, IGNORE_INDEX + 1, label) - 1  # 0 -> 255, k -> k - 1
    if num_classes is not None:
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
        if bool(bad.any()):
            raw = label[bad] + (1 if reduce_zero_label else 0)
            raise DataError(f"{ann_path} holds label values {int(raw.min())}..{int(raw.max())} outside the "
                            f"{num_classes} classes of --nb_classes"
                            + (" (labels 1..K after reduce_zero_label; 0 is ignored)" if reduce_zero_label else
                               f" (labels 0..{num_classes - 1}, 255 ignored)"))
    return img, label


def label_range(pairs: Pairs, reduce_zero_label: bool, limit: int = 16) -> tuple[Optional[int], int]:
    """The largest class index (after ``reduce_zero_label``; 255, ignored, left out) in the first ``limit``
    label maps of ``pairs`` that can be read, and how many were read: a cheap start-up look at whether
    --nb_classes fits the data (None when no labelled pixel was found). DataError when every map looked
    at has colour channels."""
    top, read, colour = None, 0, []
    for _, ann_path in pairs.samples[:limit]:
        try:
            with Image.open(ann_path) as an:
                ann = np.array(an)
        except OSError:
            continue
        if ann.ndim != 2:
            colour.append(f"{ann_path} has shape {ann.shape}")
            continue
        values = np.unique(ann)
        if reduce_zero_label:
            values = values[values != 0] - 1
        values = values[values != IGNORE_INDEX]
        read += 1
        if values.size:
            top = max(top if top is not None else -1, int(values.max()))
    if colour and not read:  # one odd file is skipped when met; a set of them cannot train at all
        raise DataError(f"the label maps are not single-channel ({colour[0]}; all {len(colour)} looked at): a label "
                        f"map holds one class index per pixel (an 8-bit grey or palette PNG); convert colour maps "
                        f"to class indices")
    return top, read


def rescale_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale), short <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _coin(g: torch.Generator) -> bool:
    return bool(torch.randint(2, (), generator=g))


def photometric_distortion(img: Tensor, g: torch.Generator, brightness: float = 32, contrast=(0.5, 1.5),
                           saturation=(0.5, 1.5), hue: int = 18) -> Tensor:
    """img: (3, H, W) float in [0, 255] -> distorted, clipped to [0, 255] (mmseg PhotoMetricDistortion)."""
    def contrast_step(x):
        return (x * _uniform(g, *contrast)).clamp(0, 255) if _coin(g) else x

    if _coin(g):
        img = (img + _uniform(g, -brightness, brightness)).clamp(0, 255)
    contrast_first = _coin(g)
    if contrast_first:
        img = contrast_step(img)
    if _coin(g):  # HSV saturation x a keeps hue and value: each channel moves towards the pixel's max
        a = _uniform(g, *saturation)
        v = img.amax(0, keepdim=True)
        img = (a * img + (1 - a) * v).clamp(0, 255)
    if _coin(g):
        delta = int(torch.randint(-hue, hue + 1, (), generator=g))
        img = TF.adjust_hue(img / 255, delta / 180) * 255
    if not contrast_first:
        img = contrast_step(img)
    return img


def normalize(img: Tensor) -> Tensor:
    return (img.float() - MEAN) / STD


class TrainTransform:
    """(image uint8 (3, H, W), labels (H, W), generator) -> (image (3, c, c) normalised, labels (c, c))."""

    def __init__(self, crop: int = 512, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True) -> None:
        self.crop, self.scale, self.ratio_range = crop, scale, ratio_range
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric

    def _box(self, h: int, w: int, g: torch.Generator) -> tuple[int, int]:
        y = int(torch.randint(max(h - self.crop, 0) + 1, (), generator=g))
        x = int(torch.randint(max(w - self.crop, 0) + 1, (), generator=g))
        return y, x

    def __call__(self, img: Tensor, label: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        r = _uniform(g, *self.ratio_range)
        h, w = rescale_size(img.shape[1], img.shape[2], (int(self.scale[0] * r), int(self.scale[1] * r)))
        img = TF.resize(img, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)
        label = TF.resize(label[None], [h, w], interpolation=InterpolationMode.NEAREST)[0]
        c = self.crop
        y, x = self._box(h, w, g)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                part = label[y:y + c, x:x + c]
                counts = torch.bincount(part[part != IGNORE_INDEX].flatten())
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y, x = self._box(h, w, g)
        img, label = img[:, y:y + c, x:x + c], label[y:y + c, x:x + c]
        if float(torch.rand((), generator=g)) < self.flip_prob:
            img, label = img.flip(-1), label.flip(-1)
        img = img.float()
        if self.photometric:
            img = photometric_distortion(img, g)
        img = normalize(img)
        ph, pw = c - img.shape[1], c - img.shape[2]
        if ph or pw:
            img = torch.nn.functional.pad(img, (0, pw, 0, ph), value=0.0)
            label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
        return img.contiguous(), label.contiguous()


def test_resize(img: Tensor, scale=(2048, 512)) -> Tensor:
    """Evaluation input: keep-ratio resize into ``scale``, normalised. img: (3, H, W) uint8."""
    h, w = rescale_size(img.shape[1], img.shape[2], scale)
    return normalize(TF.resize(img, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True))


def sample_seed(seed: int, data_pass: int, index: int) -> int:
    return (seed * 1_000_003 + data_pass * 7_919 + index * 104_729) % (2 ** 63 - 1)


class SegmentationDataset(Dataset):
    """Training items keyed (index, seed) -> (image, labels, ok); evaluation items keyed by index
    -> (resized image, original-size labels, ok). An unreadable pair (or one whose labels fall outside
    ``num_classes``) is named once (warning); in training the next readable pair replaces it, in
    evaluation it comes back empty with ok = 0."""

    def __init__(self, pairs: Pairs, train: bool, reduce_zero_label: bool = True,
                 transform: Optional[TrainTransform] = None, test_scale=(2048, 512),
                 num_classes: Optional[int] = None) -> None:
        self.pairs, self.train, self.reduce_zero_label = pairs, train, reduce_zero_label
        self.num_classes = num_classes
        self.transform = transform or TrainTransform()
        self.test_scale = test_scale
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int):
        try:
            return load_pair(*self.pairs.samples[i], self.reduce_zero_label, self.num_classes)
        except Exception as e:
            skip_sample(str(self.pairs.samples[i][0]), e, self._warned, "pair")
            return None

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        if not self.train:
            loaded = self._load(index)
            if loaded is None:
                return torch.zeros(3, 0, 0), torch.zeros(0, 0, dtype=torch.long), 0
            img, label = loaded
            return test_resize(img, self.test_scale), label, 1
        n = len(self)
        for attempt in range(min(n, 50)):
            loaded = self._load((index + attempt) % n)
            if loaded is not None:
                g = torch.Generator().manual_seed(seed)
                img, label = self.transform(*loaded, g)
                return img, label, int(attempt == 0)
        raise DataError(f"none of {min(n, 50)} consecutive pairs from {self.pairs.samples[index][0]} could be read")


class IterationSampler(Sampler):
    """Iteration-based training over a finite set: an endless stream of seeded shuffles (one per
    pass over the data), cut into chunks of ``chunk_iters`` batches (the last chunk ends at
    ``total_iters``); ``set_epoch(c)`` selects chunk c.

    Each rank takes every ``world``-th item of a pass (the last ``n % world`` items of a shuffle
    are left out, as DistributedSampler with drop_last). Items are (index, augmentation seed).
    ``skip`` items of the chunk are left out (mid-chunk resume).
    """

    def __init__(self, n: int, world: int, rank: int, seed: int, batch_size: int, total_iters: int,
                 chunk_iters: int) -> None:
        self.n, self.world, self.rank, self.seed = n, world, rank, seed
        self.batch_size, self.total_iters, self.chunk_iters = batch_size, total_iters, chunk_iters
        self.per_rank = n // world
        if self.per_rank == 0:
            raise DataError(f"{n} training pairs are fewer than the {world} ranks")
        self.epoch = 0
        self.skip = 0
        self._perm: tuple[int, Optional[Tensor]] = (-1, None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def chunk_length(self, chunk: int) -> int:
        """Iterations in chunk ``chunk``."""
        return max(min(self.chunk_iters, self.total_iters - chunk * self.chunk_iters), 0)

    def _permutation(self, data_pass: int) -> Tensor:
        if self._perm[0] != data_pass:
            g = torch.Generator().manual_seed(self.seed * 7_777 + data_pass)
            self._perm = (data_pass, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self.epoch * self.chunk_iters * self.batch_size
        for q in range(start + self.skip, start + self.chunk_length(self.epoch) * self.batch_size):
            data_pass, offset = divmod(q, self.per_rank)
            index = int(self._permutation(data_pass)[self.rank + self.world * offset])
            yield index, sample_seed(self.seed, data_pass, index)

    def __len__(self) -> int:
        return max(self.chunk_length(self.epoch) * self.batch_size - self.skip, 0)


def num_chunks(total_iters: int, chunk: int) -> int:
    return math.ceil(total_iters / chunk)
