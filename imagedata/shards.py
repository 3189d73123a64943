"""Tar-shard data sets (webdataset format) for pretraining and finetuning.

``--data_path`` names shards in one of two ways:

* a folder holding ``.tar`` files (and no ``train/``, ``val/``, list files or images beside them,
  which keep their meaning): ``<split>-*.tar`` (or ``<split>_*.tar``) are the split's shards;
  for pretraining, when no ``train-*.tar`` exist, every ``.tar`` in the folder;
* a pattern ending in ``.tar`` with brace ranges, ``/data/in1k/train-{000000..000146}.tar``; a
  literal ``{split}`` in it is replaced by ``train`` / ``val`` (finetuning needs it for ``val``).

Each sample is one image file (``jpg``, ``png``, ... as written by ``tools/make_shards.py``) and,
for labelled sets, a ``cls`` entry (the class index as text). ``<split>.json`` beside the shards
(written by make_shards) gives the samples per shard and the class names; without it, the
shards' tar headers are read once at start-up to count them.

Order and splitting (``ShardStream.plan``), per epoch:

1. training shards are shuffled with a generator seeded by (seed, epoch) and concatenated;
2. rank r takes the contiguous range [r * M, r * M + S * B) of that sequence (M = N // world,
   S = M // B steps of B images: every rank runs the same number of steps, each sample is read by
   one rank, at most world * (B + 1) images an epoch are left out, a different few every epoch);
3. the rank's steps go to DataLoader workers round-robin (step i to worker i % W, the order in which
   a DataLoader returns them; after a resume at step k, DataLoader worker d reads stream (d + k) % W);
   each worker reads one contiguous part of the rank's range (a shard
   at a boundary is read by both neighbours, each keeping its own samples), shuffles it with a
   buffer of ``SHUFFLE_BUFFER`` samples seeded by (seed, epoch, rank, worker) and collates whole
   batches itself.

Augmentation is seeded per (seed, epoch, position), as for image folders. The same seed, world
size and number of workers give the same batches; unlike an image folder, the order depends on
the world size and the number of workers (each worker streams its own shards).

Mid-epoch resume is exact: resuming at step k, each worker replays its shuffle on the raw bytes of
the samples of its first steps (read, not decoded) and starts at step k, so the batches from step k
on are those of the uninterrupted run. Evaluation sets are not shuffled; ranks take contiguous
ranges covering every sample once (the last batch may be short).

Checks, all before anything large is allocated or read:

* a pattern may name at most ``MAX_SHARDS`` shards (counted before it is expanded);
* each index entry: a whole number of samples >= 1, no more than its file can hold (a sample takes
  at least ``MIN_SAMPLE_BYTES``); a shard whose size differs from the ``filesize`` the index
  recorded has changed since: its headers are read instead, with a warning naming it;
* ``<split>.incomplete.json`` (left by an interrupted ``tools/make_shards.py``) refuses the folder;
* a tar member larger than ``MAX_MEMBER_BYTES`` is not read.

While reading, a sample that cannot be used (no image, two entries of one kind, an oversized
member, an undecodable image, a class outside the index's, the unreadable rest of a truncated
shard) is named and replaced through ``imagedata.images.skip_sample``, the one mechanism every data
path shares; a shard that holds more samples than its index says ends the run with a message naming
both. Link members are never followed: each is named once and left out.
"""
from __future__ import annotations

import collections
import glob
import hashlib
import io
import json
import os
import random
import re
import tarfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from errors import DataError
from imagedata.channels import ChannelMismatch, load_pixels
from imagedata.images import IMG_EXTENSIONS, Encoded, decode_rgb, sample_seed, seeded_apply, skip_sample

SHUFFLE_BUFFER = 1000  # samples held per worker for the within-worker shuffle (~100 MB of ImageNet JPEGs)
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
INDEX_KIND = "wids-shard-index-v1"  # the shard-index layout of webdataset's wids (url + nsamples per shard)
MAX_SHARDS = 1_000_000             # names a pattern may expand to (a range with a digit too many names billions)
MAX_MEMBER_BYTES = 256 * 2 ** 20   # larger tar members are not read (ImageNet's largest JPEG is ~15 MB)
MIN_SAMPLE_BYTES = 1024            # a sample's smallest footprint in a tar: one header and one data block
MAX_CLASSES = 1_000_000            # a class entry above this is damage, not a label
LOOKAHEAD = 50                     # samples searched for a replacement when no image of a batch is readable
INCOMPLETE_SUFFIX = ".incomplete.json"  # <split>.incomplete.json: tools/make_shards.py is (or was) writing it


class IndexMismatch(DataError):
    """A shard holds more samples than its index says: the index does not describe the shards."""


def incomplete_marker(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}{INCOMPLETE_SUFFIX}"


def is_shard_spec(data_path: Optional[str]) -> bool:
    """Whether ``data_path`` names tar shards (a pattern ending in .tar, or a folder holding .tar files)."""
    if not data_path:
        return False
    if data_path.endswith(".tar"):
        return True
    p = Path(data_path)
    if not p.is_dir():
        return False
    # an ImageNet folder often keeps its original archives (ILSVRC2012_img_train.tar) beside train/ and
    # val/: the layout or list files win, and so do images at the top level
    names = [e.name for e in os.scandir(p)]
    if any(n in ("train", "val", "train.txt", "val.txt") or n.lower().endswith(IMG_EXTENSIONS) for n in names):
        return False
    return any(n.endswith(".tar") and (p / n).is_file() for n in names)


_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?|([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?")


def brace_count(pattern: str) -> int:
    """How many names brace expansion makes of ``pattern`` ({a,b}, {0..99}, {000..998..2}, nested),
    counted without expanding it (braceexpand builds a range's whole list before yielding any name)."""
    pos = 0

    def sequence(stops: str) -> int:
        nonlocal pos
        total = 1
        while pos < len(pattern) and pattern[pos] not in stops:
            if pattern[pos] == "\\":
                pos += 2
            elif pattern[pos] == "{":
                total *= group()
            else:
                pos += 1
        return total

    def group() -> int:
        nonlocal pos
        start = pos
        pos += 1
        alternatives = []
        while True:
            alternatives.append(sequence(",}"))
            if pos >= len(pattern):  # no closing brace: a literal '{'
                pos = start + 1
                return 1
            pos += 1
            if pattern[pos - 1] == "}":
                break
        if len(alternatives) > 1:
            return sum(alternatives)
        m = _RANGE.fullmatch(pattern[start + 1:pos - 1])
        if not m:
            return alternatives[0]
        if m.group(1) is not None:
            lo, hi, step = int(m.group(1)), int(m.group(2)), m.group(3)
        else:
            lo, hi, step = ord(m.group(4)), ord(m.group(5)), m.group(6)
        return abs(hi - lo) // max(abs(int(step or 1)), 1) + 1

    return sequence("")


def _expand(pattern: str) -> list[str]:
    n = brace_count(pattern)
    if n > MAX_SHARDS:
        raise DataError(f"--data_path {pattern} names {n:,} shards, more than the {MAX_SHARDS:,} accepted: "
                        f"is a brace range a digit too long?")
    import braceexpand
    return [u for part in braceexpand.braceexpand(pattern)
            for u in ((sorted(glob.glob(part)) or [part]) if glob.has_magic(part) else [part])]


def shard_urls(data_path: str, split: str, labelled: bool) -> list[str]:
    """The shards of ``split``; raises DataError naming what was expected."""
    if data_path.endswith(".tar"):
        if "://" in data_path or data_path.startswith("pipe:"):
            raise DataError(f"--data_path {data_path}: shards must be files (a mounted shared file system "
                            f"works); URLs and pipe: streams are not supported")
        if "{split}" not in data_path and split != "train":
            raise DataError(f"--data_path {data_path}: a shard pattern needs '{{split}}' in it for the "
                            f"'{split}' split (e.g. /data/in1k/{{split}}-{{000000..000146}}.tar)")
        urls = _expand(data_path.replace("{split}", split))
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise DataError(f"--data_path {data_path}: shard {missing[0]} does not exist"
                            + (f" ({len(missing)} missing)" if len(missing) > 1 else ""))
        return urls
    root = Path(data_path)
    tars = sorted(e.name for e in os.scandir(root) if e.name.endswith(".tar") and e.is_file())
    mine = [t for t in tars if t.startswith((f"{split}-", f"{split}_"))]
    if not mine and split == "train" and not labelled and not any(t.startswith(("val-", "val_")) for t in tars):
        mine = tars
    if not mine:
        raise DataError(f"--data_path {root} has no '{split}' shards: expected {split}-*.tar "
                        f"(found {', '.join(tars[:3])}{', ...' if len(tars) > 3 else ''})")
    return [str(root / t) for t in mine]


_noted: set = set()  # link members already named by this process


def _is_meta(name: str) -> bool:
    """webdataset's metadata entries (``__name__`` as the first path component) hold no sample."""
    first = name.split("/", 1)[0]
    return first.startswith("__") and first.endswith("__")


def _cut(url: str, tar: tarfile.TarFile, e: Exception) -> DataError:
    return DataError(f"shard {url} cannot be read: {type(e).__name__}: {e} (at byte {tar.offset:,})")


def _grouped(url: str) -> Iterator[tuple[str, list, tarfile.TarFile]]:
    """(key, [(entry kind, member), ...], tar) per sample of a shard, in stored order: consecutive
    regular-file members of one key (webdataset's grouping); no member's data is read here.

    Link members are named once and left out. A shard that cannot be read on raises DataError, a
    missing end-of-archive marker included (a copy cut at a member boundary)."""
    from webdataset.tariterators import base_plus_ext
    try:
        tar = tarfile.open(url, "r:")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"shard {url} cannot be read: {type(e).__name__}: {e}") from None
    with tar:
        key, group = None, []
        while True:
            try:
                m = tar.next()
            except (tarfile.TarError, OSError, ValueError) as e:
                raise _cut(url, tar, e) from None
            if m is None:
                break
            tar.members.clear()  # the reader keeps no list of what it passed
            if not m.isreg():
                if (m.issym() or m.islnk()) and (url, m.name) not in _noted:
                    _noted.add((url, m.name))
                    warnings.warn(f"shard {url}: link member {m.name} left out (links are not followed)")
                continue
            k, kind = base_plus_ext(m.name)
            if k is None or _is_meta(m.name) or kind.startswith("__"):
                continue
            if k != key and group:
                yield key, group, tar
                group = []
            key = k
            group.append((kind.lower(), m))
        if group:
            yield key, group, tar
        tar.fileobj.seek(tar.offset)
        block = tar.fileobj.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE or block.strip(b"\0"):
            raise DataError(f"shard {url} cannot be read: it ends at byte {tar.offset:,} without the "
                            f"end-of-archive marker (a truncated or damaged copy)")


def read_shard(url: str, first: int = 0, end: Optional[int] = None, whole: bool = False) -> Iterator[dict]:
    """Samples ``first`` .. ``end - 1`` of a shard in stored order: {"__key__", "__url__", <kind>: bytes}.

    A sample that cannot be used is yielded all the same with ``__error__`` saying why (two entries of
    one kind, an entry over ``MAX_MEMBER_BYTES``, which is not read), so that positions keep matching
    the index. Samples before ``first`` are passed over without reading their data. ``whole``: the
    shard must end at ``end`` (IndexMismatch otherwise). DataError where the shard cannot be read on."""
    for i, (key, members, tar) in enumerate(_grouped(url)):
        if end is not None and i >= end:
            if whole:
                folder = Path(url).parent
                raise IndexMismatch(f"shard {url} holds more samples than the {end} its index says: the index "
                                    f"does not describe these shards; rebuild it (python tools/make_shards.py "
                                    f"--reindex --output_dir {folder}) or delete it (the headers are then read "
                                    f"at start-up)")
            return
        if i < first:
            continue
        sample = {"__key__": key, "__url__": url}
        for kind, m in members:
            if kind in sample:
                sample["__error__"] = f"two '{kind}' entries for one key ({m.name})"
            elif m.size > MAX_MEMBER_BYTES:
                sample["__error__"] = (f"entry {m.name} is {m.size:,} bytes, over the limit of "
                                       f"{MAX_MEMBER_BYTES:,} (not read)")
            else:
                try:
                    sample[kind] = tar.extractfile(m).read()
                except (tarfile.TarError, OSError) as e:
                    raise _cut(url, tar, e) from None
        yield sample


def scan_shard(url: str, labelled: bool) -> tuple[int, int]:
    """(samples, largest label + 1) of a local shard, from its tar headers (and its small cls entries).
    A class entry that is not a plausible label is not counted here: reading names that sample."""
    n, top = 0, 0
    for _, members, tar in _grouped(url):
        n += 1
        if not labelled:
            continue
        for kind, m in members:
            if kind == "cls" and m.size <= 32:
                try:
                    c = int(tar.extractfile(m).read().strip())
                except (ValueError, tarfile.TarError, OSError):
                    continue
                if 0 <= c < MAX_CLASSES:
                    top = max(top, c + 1)
    return n, top


class ShardImages:
    """The shards of one split: urls, samples per shard, file sizes, class names. Mirrors the parts of
    ``imagedata.datasets.ImageList`` that the programs use (len, classes, left_out, load, min_side)."""

    def __init__(self, urls: list[str], counts: list[int], classes: list[str], source: str,
                 sizes: Optional[list[int]] = None, labelled: bool = False) -> None:
        self.urls, self.counts, self.classes, self.source = urls, counts, classes, source
        self.sizes = sizes if sizes is not None else [os.stat(u).st_size for u in urls]
        self.labelled = labelled
        self.left_out: list = []
        self.min_side: Optional[int] = None
        self.in_chans = 3  # another count: samples decode to (C, H, W) float at full precision (imagedata.channels)
        self._warned: set = set()

    def __len__(self) -> int:
        return sum(self.counts)

    def _sample(self, index: int) -> dict:
        for url, n in zip(self.urls, self.counts):
            if index < n:
                for sample in read_shard(url, index, index + 1):
                    if "__error__" in sample:
                        raise DataError(f"sample {sample['__key__']} in {url}: {sample['__error__']}")
                    return sample
                break
            index -= n
        raise IndexError(index)

    def raw_bytes(self, index: int) -> tuple[bytes, str]:
        """A sample's image bytes and its name (reads the shard up to it)."""
        sample = self._sample(index)
        return image_bytes(sample)[1], f"{sample.get('__key__')} in {sample.get('__url__')}"

    def fingerprint(self, list_limit: int = 20_000) -> dict:
        """What identifies the data a position in an epoch refers to: each shard's name, samples and
        size (not its content: a copy to another disk keeps the fingerprint). ``list`` holds the rows
        up to ``list_limit`` shards, so that a changed one can be named."""
        rows = [[Path(u).name, n, s] for u, n, s in zip(self.urls, self.counts, self.sizes)]
        digest = hashlib.sha256("\n".join(f"{a}\t{b}\t{c}" for a, b, c in rows).encode()).hexdigest()[:16]
        return {"digest": digest, "shards": len(rows), "samples": len(self),
                "list": rows if len(rows) <= list_limit else None}

    def load(self, index: int):
        """Random access (reads the shard up to the sample): for a few figure images, not for training."""
        return decode_sample(self._sample(index), self.min_side, self._warned, in_chans=self.in_chans)


def _read_index(urls: list[str], split: str) -> Optional[dict]:
    """The index beside the shards, checked against them: counts (None where the shard's size differs
    from the recorded one: it changed after the index was written), sizes, classes."""
    folder = Path(urls[0]).parent
    path = folder / f"{split}.json"
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        entries = {Path(s["url"]).name: s for s in index["shardlist"]}
        classes = index.get("classes") or []
        if not isinstance(classes, list) or len(classes) > MAX_CLASSES:
            raise TypeError(f"'classes' is not a list of at most {MAX_CLASSES:,} names")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"shard index {path} is not valid: {type(e).__name__}: {e}") from None
    if not all(Path(u).name in entries for u in urls):
        return None
    counts, sizes = [], []
    for u in urls:
        entry = entries[Path(u).name]
        n, recorded = entry.get("nsamples"), entry.get("filesize")
        size = os.stat(u).st_size
        sizes.append(size)
        if type(n) is not int or n < 1:
            raise DataError(f"shard index {path} says {n!r} samples for {Path(u).name}: a shard holds a whole "
                            f"number of samples, at least 1; rebuild the index (python tools/make_shards.py "
                            f"--reindex --output_dir {folder}) or delete it (the headers are then read)")
        if recorded is not None and recorded != size:
            counts.append(None)
            continue
        if n * MIN_SAMPLE_BYTES > size:
            raise DataError(f"shard index {path} says {n:,} samples for {Path(u).name}, but its {size:,} bytes "
                            f"hold at most {size // MIN_SAMPLE_BYTES:,}; rebuild the index (python "
                            f"tools/make_shards.py --reindex --output_dir {folder}) or delete it")
        counts.append(n)
    return {"counts": counts, "sizes": sizes, "classes": [str(c) for c in classes], "recorded": entries}


def _refuse_partial(folder: Path, split: str, indexed: bool) -> None:
    """An interrupted tools/make_shards.py leaves its marker (or temporary shards): refuse the split."""
    marker = incomplete_marker(folder, split)
    if marker.is_file() and not indexed:
        try:
            plan = json.loads(marker.read_text())
            done, source = len(plan.get("shardlist", [])), plan.get("data_path", "SOURCE")
        except (OSError, ValueError, AttributeError):
            done, source = "some", "SOURCE"
        raise DataError(f"{folder} holds the partial output of tools/make_shards.py ({split}: {done} shards "
                        f"written before it was interrupted): finish it with python tools/make_shards.py --resume "
                        f"--data_path {source} --output_dir {folder}")
    if not indexed:
        temps = sorted(glob.glob(str(folder / f"{split}-*.tar.tmp")) + glob.glob(str(folder / f".{split}-*.tmp")))
        if temps:
            raise DataError(f"{folder} holds temporary shards of an interrupted tools/make_shards.py "
                            f"({Path(temps[0]).name}) and no {split}.json index: its output is partial; convert "
                            f"again into an empty folder")


def shard_images(data_path: str, split: str, labelled: bool) -> ShardImages:
    urls = shard_urls(data_path, split, labelled)
    folder = Path(urls[0]).parent
    index = _read_index(urls, split)
    _refuse_partial(folder, split, index is not None)
    if index is not None:
        counts, sizes, classes = index["counts"], index["sizes"], index["classes"]
        if labelled and not classes:
            raise DataError(f"shard index {folder / (split + '.json')} has no classes: "
                            f"the shards are unlabelled (tools/make_shards.py writes labels for class folders)")
        for i, u in enumerate(urls):
            if counts[i] is None:  # the shard changed after the index was written: count it afresh
                counts[i] = scan_shard(u, labelled)[0]
                recorded = index["recorded"][Path(u).name].get("filesize")
                if os.environ.get("RANK", "0") == "0":
                    print(f"warning: shard {u} is {sizes[i]:,} bytes, its index {split}.json recorded {recorded:,}: "
                          f"it changed after the index was written; read its headers instead ({counts[i]} samples)",
                          flush=True)
    else:
        t0 = time.time()
        scans = [scan_shard(u, labelled) for u in urls]
        counts = [n for n, _ in scans]
        sizes = [os.stat(u).st_size for u in urls]
        top = max((t for _, t in scans), default=0)
        if labelled and top == 0:
            raise DataError(f"--data_path {data_path}: the '{split}' shards hold no labels (.cls entries)")
        classes = [str(i) for i in range(top)] if labelled else []
        if os.environ.get("RANK", "0") == "0":
            print(f"note: no {split}.json index beside the shards: read the headers of {len(urls)} shards in "
                  f"{time.time() - t0:.1f} s (tools/make_shards.py writes the index)", flush=True)
    if not sum(counts):
        raise DataError(f"--data_path {data_path}: the '{split}' shards hold no samples")
    return ShardImages(urls, counts, classes, data_path, sizes=sizes, labelled=labelled)


def image_bytes(sample: dict) -> tuple[str, bytes]:
    for k in IMAGE_KEYS:
        if k in sample:
            return k, sample[k]
    raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image "
                    f"(entries: {', '.join(k for k in sample if not k.startswith('__'))})")


def label_of(sample: dict, classes: int = 0) -> int:
    """The sample's class index (0 without a cls entry); with ``classes``, one outside 0..classes-1 is an error."""
    c = sample.get("cls")
    label = int(c.decode() if isinstance(c, bytes) else c) if c is not None else 0
    if classes and not 0 <= label < classes:
        raise DataError(f"class {label} is outside 0..{classes - 1} (the {classes} classes of the index)")
    return label


def decode_sample(sample: dict, min_side: Optional[int], warned: set, classes: int = 0, in_chans: int = 3):
    """(image, label): 8-bit RGB PIL image, or with another ``in_chans`` (C, H, W) float at full precision."""
    _, data = image_bytes(sample)
    name = f"{sample.get('__key__')} in {sample.get('__url__')}"
    label = label_of(sample, classes)
    if in_chans != 3:
        return load_pixels(data, name, in_chans), label
    return decode_rgb(io.BytesIO(data), name, min_side, warned), label


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h * 6364136223846793005 + int(x) + 1442695040888963407) % (2 ** 64)
    return h


def shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """A seeded streaming shuffle: hold ``buffer`` items, emit a random one as each new one arrives."""
    pool: list = []
    for x in items:
        if len(pool) < buffer:
            pool.append(x)
            continue
        j = rng.randrange(len(pool))
        pool[j], x = x, pool[j]
        yield x
    rng.shuffle(pool)
    yield from pool


class ShardStream(IterableDataset):
    """Batches of one rank from tar shards: yields (images (B, 3, H, W), labels (B,), ok (B,)), the
    items a map-style data set gives through a DataLoader (ok = 0 where an undecodable image was
    replaced by another of the batch). Also plays the sampler's part (``set_epoch``, ``skip``)."""

    def __init__(self, images: ShardImages, transform: Callable, batch_size: int, seed: int, train: bool,
                 world: int = 1, rank: int = 0, shard_ranks: bool = True, buffer: int = SHUFFLE_BUFFER,
                 raw: bool = False) -> None:
        self.images, self.transform = images, transform
        self.batch_size, self.seed, self.train = batch_size, seed, train
        self.world, self.rank = (world, rank) if shard_ranks else (1, 0)
        self.buffer = buffer if train else 0
        self.raw = raw  # the transform takes the file's bytes (imagedata.images.Encoded): --decode fast / gpu
        self.epoch = 0
        self.skip = 0  # images of this epoch already consumed by this rank (mid-epoch resume)
        self.dataset = self  # what the programs ask a DataLoader's sampler for
        self._warned: set = set()

    # the sampler's part
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(self.steps() - self.skip // self.batch_size, 0)

    def steps(self) -> int:
        return len(self._batch_sizes())

    def _rank_range(self) -> tuple[int, int]:
        n = len(self.images)
        if self.train:
            m = n // self.world
            s = m // self.batch_size
            return self.rank * m, s * self.batch_size
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return lo, hi - lo

    def _batch_sizes(self) -> list[int]:
        _, length = self._rank_range()
        b = self.batch_size
        return [min(b, length - i) for i in range(0, length, b)]

    def plan(self, epoch: int, worker: int, workers: int) -> tuple[list[tuple[int, int, int, int]], list[int]]:
        """What one worker reads in ``epoch``: [(shard, first sample, end sample, epoch position of the
        first)], and the sizes of its batches (steps worker, worker + workers, ...)."""
        order = list(range(len(self.images.urls)))
        if self.train:
            random.Random(_mix(self.seed, epoch, 17)).shuffle(order)
        sizes = self._batch_sizes()
        mine = list(range(worker, len(sizes), workers))
        before = sum(sizes[i] for v in range(worker) for i in range(v, len(sizes), workers))
        start = self._rank_range()[0] + before
        end = start + sum(sizes[i] for i in mine)
        parts, pos = [], 0
        for s in order:
            n = self.images.counts[s]
            lo, hi = max(start, pos), min(end, pos + n)
            if lo < hi:
                parts.append((s, lo - pos, hi - pos, lo))
            pos += n
        return parts, [sizes[i] for i in mine]

    def _raw(self, parts) -> Iterator[tuple[dict, int]]:
        """(sample, epoch position) of the parts, in order. Every planned position yields exactly once
        (the ranks' step counts depend on it): where a shard ends early or cannot be read on, the rest of
        its part comes as samples whose ``__error__`` says why."""
        for s, first, end, pos in parts:
            url, count = self.images.urls[s], self.images.counts[s]
            i, why = first, None
            try:
                for sample in read_shard(url, first, end, whole=end == count):
                    yield sample, pos + i - first
                    i += 1
            except IndexMismatch:
                raise
            except DataError as e:
                why = str(e)
            if i < end:
                why = why or f"shard {url} holds {i} samples, its index says {count}"
                rest = {"__key__": f"samples {i}-{end - 1}", "__url__": url, "__error__": why}
                for j in range(i, end):
                    yield rest, pos + j - first

    def worker_batches(self, loader_worker: int, workers: int) -> Iterator[list[tuple[dict, int]]]:
        """Raw (sample, epoch position) batches that DataLoader worker ``loader_worker`` yields, after the
        resume skip. A DataLoader asks worker 0 first: resuming at step k, worker d takes the part of
        stream (d + k) % W, whose next step is then the d-th from k."""
        k = self.skip // self.batch_size
        worker = (loader_worker + k) % workers
        parts, sizes = self.plan(self.epoch, worker, workers)
        stream = self._raw(parts)
        if self.buffer:
            stream = shuffled(stream, self.buffer, random.Random(_mix(self.seed, self.epoch, self.rank, worker)))
        stream = self._ahead = Lookahead(stream)
        skip_steps = len(range(worker, k, workers))
        for j, size in enumerate(sizes):
            batch = [next(stream) for _ in range(size)]
            if j >= skip_steps:
                yield batch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for raw in self.worker_batches(worker, workers):
            yield self.collate(raw)

    def _load(self, sample: dict, pos: int):
        """(transformed image, label) of one raw sample, or None: then it is named (imagedata.images.skip_sample)."""
        name = f"{sample.get('__key__')} in {sample.get('__url__')}"
        if "__error__" in sample:
            skip_sample(name, sample["__error__"], self._warned)
            return None
        classes = len(self.images.classes) if self.images.labelled else 0
        try:
            if self.raw:  # --decode fast / gpu: the transform decodes the bytes
                img, label = Encoded(image_bytes(sample)[1], name), label_of(sample, classes)
            else:
                img, label = decode_sample(sample, self.images.min_side, self._warned, classes, self.images.in_chans)
            return seeded_apply(self.transform, img, sample_seed(self.seed, self.epoch, pos)), label
        except ChannelMismatch:
            raise  # the data set does not fit the model: not a sample to skip
        except Exception as e:  # a corrupt image must not end the run: named, replaced by the caller
            skip_sample(name, e, self._warned)
            return None

    def _replacement(self):
        """When no image of a batch can be used: the first usable one among the next LOOKAHEAD samples of
        this worker's stream (left in the stream), else the latest usable one among the LOOKAHEAD before
        the batch; None when there is neither. Both come from the raw stream, which a resumed run
        replays, so a resumed run takes the same one."""
        ahead = getattr(self, "_ahead", None)
        if ahead is None:
            return None
        for sample, pos in [*ahead.peek(LOOKAHEAD), *reversed(ahead.history)]:
            item = self._load(sample, pos)
            if item is not None:
                return item
        return None

    def collate(self, raw: list[tuple[dict, int]]):
        loaded = [self._load(sample, pos) for sample, pos in raw]
        ok = [int(x is not None) for x in loaded]
        good = [x for x in loaded if x is not None]
        if not good:
            donor = self._replacement()
            if donor is None:
                raise DataError(f"no image of a batch, nor of the {LOOKAHEAD} samples before and after it, could "
                                f"be used (first: {raw[0][0].get('__key__')} in {raw[0][0].get('__url__')}; each is "
                                f"named above)")
            good = [donor]
        # an unusable sample is replaced by a usable one of the same batch, as an image folder does
        filled = [x if x is not None else good[i % len(good)] for i, x in enumerate(loaded)]
        outs, labels = [x[0] for x in filled], [x[1] for x in filled]
        labels, ok = torch.tensor(labels, dtype=torch.long), torch.tensor(ok, dtype=torch.long)
        return (torch.stack(outs) if isinstance(outs[0], torch.Tensor) else outs), labels, ok


class Lookahead:
    """An iterator that can show its next items without consuming them, and keeps its last ``keep``
    items (``history``)."""

    def __init__(self, items: Iterator, keep: int = LOOKAHEAD) -> None:
        self.items, self.buffer = items, collections.deque()
        self.history: collections.deque = collections.deque(maxlen=keep)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.buffer.popleft() if self.buffer else next(self.items)
        self.history.append(item)
        return item

    def peek(self, n: int) -> list:
        while len(self.buffer) < n:
            try:
                self.buffer.append(next(self.items))
            except StopIteration:
                break
        return list(self.buffer)[:n]


def shard_loader(stream: ShardStream, num_workers: int, pin_memory: bool, worker_init_fn=None) -> DataLoader:
    """A DataLoader over a ShardStream (batches are collated in the workers). Workers are not kept
    between epochs: each epoch's workers start from the stream's new epoch and skip."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, worker_init_fn=worker_init_fn,
                      prefetch_factor=2 if num_workers else None)
