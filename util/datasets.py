"""Image datasets for pretraining and finetuning.

* ``--data_path`` in ImageNet layout (``train/<class>/*``, ``val/<class>/*``) through
  torchvision's ``ImageFolder``; or the reference's ``train.txt`` / ``val.txt`` lists
  ("relative/path label" lines under ``train/`` / ``val/``) when present; or, for
  pretraining, a plain folder of images (searched recursively).
* No ``--data_path``: the bundled sample photographs (``data/sample_images``).
* An unreadable image is skipped with a warning that names it, and counted.
* Augmentation randomness is seeded per (seed, epoch, sample), so a run gives the
  same crops whatever the number of workers, and a resumed run the same as an
  uninterrupted one.
"""
from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "data" / "sample_images"


class DataError(ValueError):
    """A data folder that cannot be used (missing, empty, inconsistent)."""


def pretrain_transform(input_size: int) -> Callable:
    """The reference's pretraining augmentation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageList(Dataset):
    """(path, label) pairs; ``load`` returns the RGB image or raises."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Optional[list[str]] = None) -> None:
        self.samples = list(samples)
        self.classes = classes or []

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB"), label


def _list_file(root: Path, split: str) -> Optional[ImageList]:
    listing = root / f"{split}.txt"
    if not listing.is_file():
        return None
    samples = []
    for line in listing.read_text().splitlines():
        if line.strip():
            rel, *label = line.split()
            samples.append((str(root / split / rel), int(label[0]) if label else 0))
    return ImageList(samples)


def find_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def image_list(data_path: Optional[str], split: str, labelled: bool) -> ImageList:
    """The images of one split, in whichever layout ``data_path`` uses."""
    if data_path is None:
        files = find_images(SAMPLE_IMAGES)
        if not files:
            raise DataError(f"the bundled sample images are missing from {SAMPLE_IMAGES}")
        return ImageList([(f, 0) for f in files])
    root = Path(data_path)
    if not root.is_dir():
        raise DataError(f"--data_path {root} does not exist or is not a folder")
    listed = _list_file(root, split)
    if listed is not None:
        if not len(listed):
            raise DataError(f"{root / (split + '.txt')} lists no images")
        return listed
    split_dir = root / split
    if split_dir.is_dir():
        try:
            folder = datasets.ImageFolder(str(split_dir), allow_empty=False)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"--data_path {root}: {split}/ holds no class folders with images ({e})") from None
        return ImageList(folder.samples, folder.classes)
    if labelled:
        raise DataError(f"--data_path {root} has no '{split}' split: expected {split}/<class>/<image> "
                        f"or a {split}.txt list")
    files = find_images(root)
    if not files:
        raise DataError(f"--data_path {root} contains no images ({', '.join(IMG_EXTENSIONS)})")
    return ImageList([(f, 0) for f in files])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed independent of workers and resumption."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2 ** 63 - 1)


class SeededImageDataset(Dataset):
    """Wraps an ``ImageList``: keys are (index, seed); unreadable images are replaced and flagged.

    Returns (image tensor, label, ok) with ok = 0 when the requested image could not be read.
    """

    def __init__(self, images: ImageList, transform: Callable, repeats: int = 1) -> None:
        self.images = images
        self.transform = transform
        self.repeats = repeats
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        n = len(self.images)
        ok = 1
        for attempt in range(min(n, 50)):
            i = (index + attempt) % n
            try:
                img, label = self.images.load(i)
                break
            except Exception as e:  # a corrupt or unreadable file must not kill the run
                ok = 0
                path = self.images.samples[i][0]
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
        else:
            raise DataError(f"none of {min(n, 50)} consecutive images starting at "
                            f"{self.images.samples[index % n][0]} could be read")
        # timm's RandAugment / RandomErasing also draw from `random` and NumPy: seed all three, then restore.
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2 ** 32)
                return self.transform(img), label, ok
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededSampler(Sampler):
    """A ``DistributedSampler`` whose items carry a per-sample augmentation seed."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                        seed=seed, drop_last=drop_last)
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # items of this epoch already consumed (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for pos, index in enumerate(self.inner):
            if pos >= self.skip:
                yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)


class ShardSampler(Sampler):
    """Rank r takes items r, r + W, r + 2W, ...: every item exactly once across ranks (no padding,
    unlike DistributedSampler), for evaluation and feature extraction."""

    def __init__(self, n: int, num_replicas: int, rank: int) -> None:
        self.n, self.world, self.rank = n, num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def build_pretrain_dataset(args) -> SeededImageDataset:
    images = image_list(args.data_path, "train", labelled=False)
    # The few bundled photos are repeated so that an epoch holds many random crops of them.
    repeats = 1
    if args.data_path is None:
        world = getattr(args, "world_size", 1)
        repeats = max(1, math.ceil(16 * args.batch_size * world / len(images)))
    return SeededImageDataset(images, pretrain_transform(args.input_size), repeats=repeats)



def eval_transform(input_size: int) -> Callable:
    """The reference's evaluation transform: resize to size / crop_pct, centre crop.
    crop_pct = 224/256 up to 224 px, 1.0 above."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def finetune_train_transform(args) -> Callable:
    """timm's training transform: RandomResizedCrop, flip, RandAugment, random erasing."""
    from timm.data import create_transform
    return create_transform(input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
                            scale=(getattr(args, "min_crop_scale", 0.08), 1.0),
                            auto_augment=args.aa, interpolation="bicubic", re_prob=args.reprob,
                            re_mode=args.remode, re_count=args.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def num_classes_of(images: ImageList) -> int:
    if images.classes:
        return len(images.classes)
    return max((label for _, label in images.samples), default=-1) + 1


def build_finetune_dataset(args, split: str, transform: Optional[Callable] = None) -> SeededImageDataset:
    """``split`` in {'train', 'val'}: ImageNet layout or the reference's list files (labelled)."""
    images = image_list(args.data_path, split, labelled=True)
    if transform is None:
        transform = finetune_train_transform(args) if split == "train" else eval_transform(args.input_size)
    return SeededImageDataset(images, transform)
