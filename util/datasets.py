"""Image datasets for pretraining and finetuning.

* ``--data_path`` in ImageNet layout (``train/<class>/*``, ``val/<class>/*``; the labels and
  order of torchvision's ``ImageFolder``); or the reference's ``train.txt`` / ``val.txt`` lists
  ("relative/path label" lines under ``train/`` / ``val/``) when present; or, for
  pretraining, a plain folder of images (searched recursively).
* Tar shards (webdataset format; a folder of ``.tar`` files or a ``.tar`` pattern): ``util/shards.py``.
* No ``--data_path``: the bundled sample photographs (``data/sample_images``).
* A sample that cannot be used is skipped: ``skip_sample`` names it (a warning, and a line of the
  run's ``skipped-samples.txt``), the data set replaces it and flags it (ok = 0); the training loop
  counts the flags per epoch, summed over ranks, and ``check_skipped`` ends the run with the list
  when an epoch skipped more than ``--max_skipped``. Every data path uses this one mechanism.
  Files left out when listing (unsupported type, broken link, link loop, unreadable folder)
  are named once with the reason (``report_left_out``).
* High-bit-depth images are scaled to 8 bits (``to_rgb8``); large JPEGs are decoded at a
  reduced scale when the crop allows (``ImageList.min_side``).
* Augmentation randomness is seeded per (seed, epoch, sample), so a run gives the
  same crops whatever the number of workers, and a resumed run the same as an
  uninterrupted one.
"""
from __future__ import annotations

import errno
import math
import os
import random
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "data" / "sample_images"


class DataError(ValueError):
    """A data folder that cannot be used (missing, empty, inconsistent)."""


SKIP_LOG_ENV = "MIM_SKIPPED_SAMPLES"      # the run's list of skipped samples (set by util.run.run_epochs)
SKIP_LIST_NAME = "skipped-samples.txt"    # that list, in --output_dir
SKIP_COUNT_KEYS = ("skipped_images", "replaced_pairs")  # the loop's per-epoch counts of replaced samples
SKIP_LIMIT_MIN, SKIP_LIMIT_SHARE = 50, 0.01  # default --max_skipped: 1% of an epoch's samples, at least 50


def skip_sample(name: str, error, warned: set, what: str = "image") -> None:
    """Report a sample that a data path cannot use; the caller replaces it and flags it (ok = 0).

    Named once per data set and process: a warning, and a line ``name<TAB>reason`` appended to the
    run's skipped-samples.txt (DataLoader workers inherit its path through SKIP_LOG_ENV). One
    ``write`` per line, so lines of several workers do not interleave."""
    if name in warned:
        return
    warned.add(name)
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    reason = " ".join(reason.split())
    warnings.warn(f"skipping unreadable {what} {name}: {reason}")
    path = os.environ.get(SKIP_LOG_ENV)
    if path:
        try:
            with open(path, "a") as f:
                f.write(f"{name}\t{reason}\n")
        except OSError:
            pass  # the list is a convenience; the warning has named the sample


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


PRETRAIN_SCALE = (0.2, 1.0)


def pretrain_transform(input_size: int) -> Callable:
    """The reference's pretraining augmentation (its randomness: torch's generator only)."""
    tf = transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=PRETRAIN_SCALE, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    tf.torch_rng_only = True
    return tf


HUGE_PIXELS = 50_000_000  # decoded in full, such an image costs > 150 MB per worker and seconds per epoch


def to_rgb8(img: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel, scaling high-bit-depth modes instead of clipping them.

    PIL's ``convert("RGB")`` clips 16-bit grey ("I;16", "I") to 255: a 16-bit photo comes out
    almost white. 16-bit data is scaled by 255/65535; 32-bit integers ("I") by their bit depth;
    float images ("F") from [0, 1] or, when larger, from [0, 255] (clipped)."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        if mode == "F":
            a = a.astype(np.float64)
            a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
            a = np.clip(np.nan_to_num(a), 0, 255)
        else:
            a = a.astype(np.int64)
            top = 65535 if mode.startswith("I;16") else max(65535, (1 << int(a.max()).bit_length()) - 1)
            a = np.clip(a, 0, None) * 255.0 / top
        g = np.rint(a).astype(np.uint8)
        return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB")
    return img.convert("RGB")


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
        self.raw = False  # load gives the file's bytes (util.decode.Encoded): --decode fast / gpu

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        if self.raw:
            from .decode import Encoded
            with open(path, "rb") as f:
                return Encoded(f.read(), path), label
        with open(path, "rb") as f:
            return decode_rgb(f, path, self.min_side, self._warned_huge), label


def decode_rgb(f, name: str, min_side: Optional[int], warned_huge: set) -> Image.Image:
    """Decode an image file object to 8-bit RGB; a JPEG whose sides are both >= 2 * min_side at a
    reduced DCT scale (PIL ``draft``), a huge image of another format in full, named once."""
    img = Image.open(f)
    w, h = img.size
    if min_side and img.format == "JPEG" and min(w, h) >= 2 * min_side:
        img.draft("RGB", (min_side, min_side))
    elif w * h > HUGE_PIXELS and name not in warned_huge:
        warned_huge.add(name)
        warnings.warn(f"image {name} is {w}x{h} ({w * h / 1e6:.0f} MP, {img.format}): decoded at full size "
                      f"every epoch (only JPEG can be decoded at a reduced scale); resizing the data set "
                      f"once saves memory and time")
    return to_rgb8(img)


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
    from .shards import is_shard_spec, shard_images
    if is_shard_spec(data_path):  # tar shards (util/shards.py)
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
                if self.images.raw:  # --decode fast/gpu: the transform decodes, so its failure is the file's
                    return seeded_apply(self.transform, img, seed), label, ok
                break
            except Exception as e:  # a corrupt or unreadable file must not kill the run
                ok = 0
                skip_sample(self.images.samples[i][0], e, self._warned)
        else:
            raise DataError(f"none of {min(n, 50)} consecutive images starting at "
                            f"{self.images.samples[index % n][0]} could be read")
        return seeded_apply(self.transform, img, seed), label, ok


def seeded_apply(transform: Callable, img, seed: int):
    """``transform(img)`` with torch's CPU generator, ``random`` and NumPy seeded from ``seed``; the
    global states are restored. A transform marked ``torch_rng_only`` (torchvision's crops and flips
    draw from torch alone) skips ``random`` and NumPy, whose state round trip costs ~0.15 ms."""
    # (default_generator.manual_seed: torch.manual_seed also reseeds every device, ~0.2 ms a call)
    if getattr(transform, "torch_rng_only", False):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return transform(img)
    # timm's RandAugment / RandomErasing also draw from `random` and NumPy: seed all three, then restore.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            return transform(img)
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
    images.min_side = needed_side(args.input_size, PRETRAIN_SCALE[0])
    if not isinstance(images, ImageList):
        return _shard_stream(images, pretrain_transform(args.input_size), args, train=True)
    return SeededImageDataset(images, pretrain_transform(args.input_size), repeats=repeats)


def _shard_stream(images, transform: Callable, args, train: bool):
    from .distributed import get_rank, get_world_size
    from .shards import ShardStream
    if train:  # checkpoints record the training shards; a resume on other shards is named (util.train_state)
        args.data_fingerprint = images.fingerprint()
    return ShardStream(images, transform, args.batch_size, args.seed, train=train, world=get_world_size(),
                       rank=get_rank())


def needed_side(input_size: int, min_scale: float, min_ratio: float = 3 / 4) -> int:
    """Shortest image side whose smallest RandomResizedCrop (area fraction ``min_scale``, aspect
    ``min_ratio``) is still >= ``input_size`` pixels on its shorter side: above it, nothing is lost
    by decoding at a reduced scale."""
    return math.ceil(input_size / math.sqrt(min_scale * min_ratio))



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
    """``split`` in {'train', 'val'}: ImageNet layout, the reference's list files or tar shards (labelled)."""
    images = image_list(args.data_path, split, labelled=True)
    training = transform is None and split == "train"
    if training:
        transform = finetune_train_transform(args)
        images.min_side = needed_side(args.input_size, 0.08)  # timm's RandomResizedCrop scale (0.08, 1)
    else:  # the evaluation transform resizes the shorter side to input / crop_pct
        transform = transform or eval_transform(args.input_size)
        images.min_side = math.ceil(args.input_size / (224 / 256 if args.input_size <= 224 else 1.0))
    if not isinstance(images, ImageList):  # training shards are shuffled; evaluation shards read in order
        return _shard_stream(images, transform, args, train=split == "train" and training)
    return SeededImageDataset(images, transform)
