"""Image datasets for pretraining and finetuning.

* ``--data_path`` in ImageNet layout (``train/<class>/*``, ``val/<class>/*``; the labels and
  order of torchvision's ``ImageFolder``); or the reference's ``train.txt`` / ``val.txt`` lists
  ("relative/path label" lines under ``train/`` / ``val/``) when present; or, for
  pretraining, a plain folder of images (searched recursively).
* Tar shards (webdataset format; a folder of ``.tar`` files or a ``.tar`` pattern): ``imagedata/shards.py``.
* No ``--data_path``: the bundled sample photographs (``data/sample_images``).
* A sample that cannot be used is skipped: ``skip_sample`` names it (a warning, and a line of the
  run's ``skipped-samples.txt``), the data set replaces it and flags it (ok = 0); the training loop
  counts the flags per epoch, summed over ranks, and ``check_skipped`` ends the run with the list
  when an epoch skipped more than ``--max_skipped``. Every data path uses this one mechanism.
  Files left out when listing (unsupported type, broken link, link loop, unreadable folder)
  are named once with the reason (``report_left_out``).
* With 3 channels, high-bit-depth images are scaled to 8 bits (``to_rgb8``); large JPEGs are
  decoded at a reduced scale when the crop allows (``ImageList.min_side``). Another channel count
  (``Pixels.in_chans``) reads every file at full precision (imagedata/channels.py); the transforms
  normalise with ``Pixels.mean`` / ``std`` (imagedata/normstats.py).
* Augmentation randomness is seeded per (seed, epoch, sample), so a run gives the
  same crops whatever the number of workers, and a resumed run the same as an
  uninterrupted one.
"""
from __future__ import annotations

import errno
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from errors import DataError
from imagedata.channels import RGB, ChannelMismatch, Pixels, load_pixels
from imagedata.channels import eval_transform as array_eval_transform
from imagedata.channels import finetune_transform as array_finetune_transform
from imagedata.channels import pretrain_transform as array_pretrain_transform
from imagedata.images import (IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, PRETRAIN_SCALE, SAMPLE_IMAGES, SKIP_LOG_ENV,
                              Encoded, decode_rgb, sample_seed, seeded_apply, skip_sample)
from imagedata.shards import ShardStream, is_shard_spec, shard_images

SKIP_LIST_NAME = "skipped-samples.txt"    # that list, in --output_dir
SKIP_COUNT_KEYS = ("skipped_images", "replaced_pairs")  # the loop's per-epoch counts of replaced samples
SKIP_LIMIT_MIN, SKIP_LIMIT_SHARE = 50, 0.01  # default --max_skipped: 1% of an epoch's samples, at least 50


class TooManySkipped(DataError):
    """An epoch skipped more samples than --max_skipped allows."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


def skip_limit(max_skipped: Optional[int], samples: int) -> Optional[int]:
    """The most samples an epoch of ``samples`` may skip: ``--max_skipped`` (-1: no limit), by default
    1% of the epoch and at least 50."""
    if max_skipped is None:
        return max(SKIP_LIMIT_MIN, math.ceil(SKIP_LIMIT_SHARE * samples))
    return None if max_skipped < 0 else max_skipped


def read_skip_list(path: Path) -> list[tuple[str, str]]:
    """(name, reason) of each sample in a skipped-samples.txt, once each, in the order first met."""
    seen: dict[str, str] = {}
    try:
        for line in Path(path).read_text(errors="replace").splitlines():
            name, _, reason = line.partition("\t")
            seen.setdefault(name, reason)
    except OSError:
        pass
    return list(seen.items())


def check_skipped(stats: dict, epoch: int, max_skipped: Optional[int], list_path: Optional[Path],
                  show: int = 5) -> None:
    """Raise TooManySkipped when the epoch's skipped samples (``stats``, summed over ranks by the
    loop) exceed the limit; the message names the first ``show`` of the list and where the rest is."""
    skipped = sum(int(stats.get(k) or 0) for k in SKIP_COUNT_KEYS)
    samples = round(float(stats.get("images_per_sec") or 0) * float(stats.get("epoch_time_s") or 0))
    limit = skip_limit(max_skipped, samples)
    if limit is None or skipped <= limit:
        return
    listed = read_skip_list(list_path) if list_path is not None else []
    names = "; ".join(f"{n} ({r})" for n, r in listed[:show])
    more = f" and {len(listed) - show} more" if len(listed) > show else ""
    where = f"; the list: {list_path}" if listed else ""
    raise TooManySkipped(f"{skipped} samples of epoch {epoch} could not be used (all ranks), more than the limit of "
                         f"{limit} (--max_skipped; default 1% of an epoch, at least {SKIP_LIMIT_MIN})"
                         + (f": {names}{more}" if names else "") + where, epoch)



def pretrain_transform(input_size: int, pixels: Pixels = RGB) -> Callable:
    """The reference's pretraining augmentation (its randomness: torch's generator only); for another
    channel count, its crop and flip on full-precision arrays (imagedata.channels)."""
    if pixels.arrays:
        return array_pretrain_transform(input_size, pixels.mean, pixels.std)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=PRETRAIN_SCALE, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(pixels.mean, pixels.std),
    ])
    tf.torch_rng_only = True
    return tf



class ImageList(Dataset):
    """(path, label) pairs; ``load`` returns the RGB image or raises.

    ``min_side``: the shortest side the transform needs without upsampling its smallest crop;
    a larger JPEG is decoded at a reduced scale (PIL ``draft``, exact DCT scaling by 1/2, 1/4,
    1/8) as long as both sides stay >= min_side. A huge image of another format is decoded in
    full and named once with its size. ``left_out``: (path, reason) of files not listed."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Optional[list[str]] = None,
                 left_out: Sequence[tuple[str, str]] = ()) -> None:
        self.samples = list(samples)
        self.classes = classes or []
        self.left_out = list(left_out)
        self.min_side: Optional[int] = None
        self._warned_huge: set[str] = set()
        self.raw = False  # load gives the file's bytes (imagedata.images.Encoded): --decode fast / gpu
        self.in_chans = 3  # another count: load gives (C, H, W) float at full precision (imagedata.channels)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        if self.raw:
            with open(path, "rb") as f:
                return Encoded(f.read(), path), label
        if self.in_chans != 3:
            with open(path, "rb") as f:
                return load_pixels(f.read(), path, self.in_chans), label
        with open(path, "rb") as f:
            return decode_rgb(f, path, self.min_side, self._warned_huge), label

    def raw_bytes(self, index: int) -> tuple[bytes, str]:
        """The file's bytes and its name (for checks and statistics that read the data as it is)."""
        path = self.samples[index][0]
        with open(path, "rb") as f:
            return f.read(), path



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


def walk_images(folder: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``folder`` (symbolic links followed, each real folder once) and what was
    left out, with the reason: unsupported type, broken link, link loop, unreadable folder.

    Order: torchvision's ImageFolder order (folders sorted by path, files sorted within each)."""
    found: list[tuple[str, list[str]]] = []
    left_out: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    pending = [str(folder)]
    while pending:
        d = pending.pop()
        try:
            st = os.stat(d)
        except OSError as e:
            left_out.append((d, _os_reason(e, "unreadable folder")))
            continue
        if (st.st_dev, st.st_ino) in seen:
            left_out.append((d, "symbolic link loop (folder already listed)"))
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            left_out.append((d, _os_reason(e, "unreadable folder")))
            continue
        files = []
        for e in entries:
            try:
                is_dir, is_file = e.is_dir(), e.is_file()
            except OSError as err:
                left_out.append((e.path, _os_reason(err, "unreadable")))
                continue
            if is_dir:
                pending.append(e.path)
            elif is_file:
                if os.path.splitext(e.name)[1].lower() in IMG_EXTENSIONS:
                    files.append(e.path)
                else:
                    ext = os.path.splitext(e.name)[1] or "no extension"
                    left_out.append((e.path, f"unsupported type ({ext})"))
            elif e.is_symlink():
                left_out.append((e.path, _broken_link_reason(e.path)))
            else:
                left_out.append((e.path, "not a regular file"))
        found.append((d, files))
    found.sort(key=lambda t: t[0])
    return [f for _, files in found for f in files], left_out


def _os_reason(e: OSError, what: str) -> str:
    if e.errno == errno.ELOOP:
        return "symbolic link loop"
    return f"{what}: {e.strerror or e}"


def _broken_link_reason(path: str) -> str:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"broken symbolic link (to {os.readlink(path)})"
    return "not a regular file"


def find_images(folder: Path) -> list[str]:
    return walk_images(folder)[0]


def report_left_out(images: ImageList, log=print, limit: int = 50) -> None:
    """Name every left-out file once: up to ``limit`` lines, then a count by reason (rank 0 only)."""
    if not images.left_out or os.environ.get("RANK", "0") != "0":
        return
    for path, reason in images.left_out[:limit]:
        log(f"warning: left out {path}: {reason}")
    rest = images.left_out[limit:]
    if rest:
        by_reason: dict[str, int] = {}
        for _, reason in rest:
            key = reason.split(" (")[0].split(":")[0]
            by_reason[key] = by_reason.get(key, 0) + 1
        log(f"warning: left out {len(rest)} more files: " + ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items())))


def image_list(data_path: Optional[str], split: str, labelled: bool) -> ImageList:
    """The images of one split, in whichever layout ``data_path`` uses."""
    if data_path is None:
        files = walk_images(SAMPLE_IMAGES)[0]  # (its ATTRIBUTION.md is not worth a warning)
        if not files:
            raise DataError(f"the bundled sample images are missing from {SAMPLE_IMAGES}")
        return ImageList([(f, 0) for f in files])
    if is_shard_spec(data_path):  # tar shards (imagedata/shards.py)
        return shard_images(data_path, split, labelled)
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
        return _class_folders(root, split_dir, split)
    if labelled:
        raise DataError(f"--data_path {root} has no '{split}' split: expected {split}/<class>/<image> "
                        f"or a {split}.txt list")
    files, left_out = walk_images(root)
    if not files:
        raise DataError(f"--data_path {root} contains no images ({', '.join(IMG_EXTENSIONS)})")
    return ImageList([(f, 0) for f in files], left_out=left_out)


def _class_folders(root: Path, split_dir: Path, split: str) -> ImageList:
    """ImageNet layout: one folder per class (sorted names are labels, as in torchvision's ImageFolder)."""
    classes, samples, left_out = [], [], []
    for e in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if e.is_dir():
            classes.append(e.name)
        elif not e.is_symlink() or os.path.exists(e.path):
            left_out.append((e.path, "not in a class folder"))
        else:
            left_out.append((e.path, _broken_link_reason(e.path)))
    if not classes:
        raise DataError(f"--data_path {root}: {split}/ holds no class folders with images")
    for label, name in enumerate(classes):
        files, lost = walk_images(split_dir / name)
        left_out += lost
        if not files:
            raise DataError(f"--data_path {root}: class folder {split}/{name} holds no images "
                            f"({', '.join(IMG_EXTENSIONS)})")
        samples += [(f, label) for f in files]
    return ImageList(samples, classes, left_out)



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
                if self.images.raw:  # --decode fast/gpu: the transform decodes, so its failure is the file's
                    return seeded_apply(self.transform, img, seed), label, ok
                break
            except ChannelMismatch:
                raise  # the data set does not fit the model: not a sample to skip
            except Exception as e:  # a corrupt or unreadable file must not kill the run
                ok = 0
                skip_sample(self.images.samples[i][0], e, self._warned)
        else:
            raise DataError(f"none of {min(n, 50)} consecutive images starting at "
                            f"{self.images.samples[index % n][0]} could be read")
        return seeded_apply(self.transform, img, seed), label, ok



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


def build_pretrain_dataset(data_path: Optional[str], input_size: int, batch_size: int, seed: int, world: int = 1,
                           rank: int = 0, pixels: Pixels = RGB) -> SeededImageDataset | ShardStream:
    """The pretraining images with the reference's augmentation (``pretrain_transform``); tar shards
    give a ``ShardStream`` of this rank's batches."""
    images = image_list(data_path, "train", labelled=False)
    images.in_chans = pixels.in_chans
    # The few bundled photos are repeated so that an epoch holds many random crops of them.
    repeats = 1
    if data_path is None:
        repeats = max(1, math.ceil(16 * batch_size * world / len(images)))
    images.min_side = needed_side(input_size, PRETRAIN_SCALE[0])
    if not isinstance(images, ImageList):
        return ShardStream(images, pretrain_transform(input_size, pixels), batch_size, seed, train=True, world=world,
                           rank=rank)
    return SeededImageDataset(images, pretrain_transform(input_size, pixels), repeats=repeats)


def needed_side(input_size: int, min_scale: float, min_ratio: float = 3 / 4) -> int:
    """Shortest image side whose smallest RandomResizedCrop (area fraction ``min_scale``, aspect
    ``min_ratio``) is still >= ``input_size`` pixels on its shorter side: above it, nothing is lost
    by decoding at a reduced scale."""
    return math.ceil(input_size / math.sqrt(min_scale * min_ratio))


def eval_transform(input_size: int, pixels: Pixels = RGB) -> Callable:
    """The reference's evaluation transform: resize to size / crop_pct, centre crop.
    crop_pct = 224/256 up to 224 px, 1.0 above."""
    if pixels.arrays:
        return array_eval_transform(input_size, pixels.mean, pixels.std)
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(pixels.mean, pixels.std),
    ])


def finetune_train_transform(input_size: int, color_jitter: Optional[float], min_crop_scale: float,
                             aa: Optional[str], reprob: float, remode: str, recount: int,
                             pixels: Pixels = RGB) -> Callable:
    """timm's training transform: RandomResizedCrop, flip, RandAugment, random erasing (for another
    channel count: the geometric part and random erasing, imagedata.channels)."""
    if pixels.arrays:
        return array_finetune_transform(input_size, min_crop_scale, reprob, remode, recount, pixels.mean, pixels.std)
    from timm.data import create_transform
    return create_transform(input_size=input_size, is_training=True, color_jitter=color_jitter,
                            scale=(min_crop_scale, 1.0), auto_augment=aa, interpolation="bicubic", re_prob=reprob,
                            re_mode=remode, re_count=recount, mean=pixels.mean, std=pixels.std)


def num_classes_of(images: ImageList) -> int:
    if images.classes:
        return len(images.classes)
    return max((label for _, label in images.samples), default=-1) + 1


def build_finetune_dataset(data_path: str, split: str, input_size: int, batch_size: int, seed: int,
                           transform: Optional[Callable] = None, training: bool = False, world: int = 1,
                           rank: int = 0, pixels: Pixels = RGB) -> SeededImageDataset | ShardStream:
    """``split`` in {'train', 'val'}: ImageNet layout, the reference's list files or tar shards
    (labelled), with ``transform`` (default: the evaluation transform). ``training``: the transform
    is a training one (its crops decide how far JPEGs may be decoded at reduced scale; shards shuffle)."""
    images = image_list(data_path, split, labelled=True)
    images.in_chans = pixels.in_chans
    if training:
        images.min_side = needed_side(input_size, 0.08)  # timm's RandomResizedCrop scale (0.08, 1)
    else:  # the evaluation transform resizes the shorter side to input / crop_pct
        images.min_side = math.ceil(input_size / (224 / 256 if input_size <= 224 else 1.0))
    transform = transform or eval_transform(input_size, pixels)
    if not isinstance(images, ImageList):  # training shards are shuffled; evaluation shards read in order
        return ShardStream(images, transform, batch_size, seed, train=training, world=world, rank=rank)
    return SeededImageDataset(images, transform)


def data_fingerprint(dataset) -> Optional[dict]:
    """What checkpoints record of a training set of tar shards (``ShardImages.fingerprint``: names,
    samples, sizes and their digest), so that a resume on other shards is named; None otherwise."""
    return dataset.images.fingerprint() if isinstance(dataset, ShardStream) else None
