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
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import random
import tarfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imagedata.images import Encoded
from errors import DataError
from imagedata.images import IMG_EXTENSIONS, decode_rgb, sample_seed, seeded_apply

SHUFFLE_BUFFER = 1000  # samples held per worker for the within-worker shuffle (~100 MB of ImageNet JPEGs)
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
INDEX_KIND = "wids-shard-index-v1"  # the shard-index layout of webdataset's wids (url + nsamples per shard)


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


def _expand(pattern: str) -> list[str]:
    import braceexpand
    return [u for part in braceexpand.braceexpand(pattern) for u in (sorted(glob.glob(part)) or [part])]


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


def _key_of(name: str) -> Optional[str]:
    from webdataset.tariterators import base_plus_ext
    return base_plus_ext(name)[0]


def scan_shard(url: str, labelled: bool) -> tuple[int, int]:
    """(samples, largest label + 1) of a local shard, from its tar headers (and its small cls entries)."""
    n, top, last = 0, 0, None
    try:
        with tarfile.open(url, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key = _key_of(m.name)
                if key is None or os.path.basename(m.name).startswith("__"):
                    continue
                if key != last:
                    n, last = n + 1, key
                if labelled and m.name.endswith(".cls"):
                    top = max(top, int(tar.extractfile(m).read().strip()) + 1)
    except (tarfile.TarError, OSError, ValueError) as e:
        raise DataError(f"shard {url} cannot be read: {type(e).__name__}: {e}") from None
    return n, top


class ShardImages:
    """The shards of one split: urls, samples per shard, class names. Mirrors the parts of
    ``imagedata.datasets.ImageList`` that the programs use (len, classes, left_out, load, min_side)."""

    def __init__(self, urls: list[str], counts: list[int], classes: list[str], source: str) -> None:
        self.urls, self.counts, self.classes, self.source = urls, counts, classes, source
        self.left_out: list = []
        self.min_side: Optional[int] = None
        self._warned: set = set()

    def __len__(self) -> int:
        return sum(self.counts)

    def load(self, index: int):
        """Random access (reads the shard up to the sample): for a few figure images, not for training."""
        for url, n in zip(self.urls, self.counts):
            if index < n:
                for i, sample in enumerate(read_shard(url)):
                    if i == index:
                        return decode_sample(sample, self.min_side, self._warned)
                break
            index -= n
        raise IndexError(index)


def _read_index(urls: list[str], split: str) -> Optional[dict]:
    folder = Path(urls[0]).parent
    path = folder / f"{split}.json"
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        counts = {Path(s["url"]).name: int(s["nsamples"]) for s in index["shardlist"]}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"shard index {path} is not valid: {type(e).__name__}: {e}") from None
    if all(Path(u).name in counts for u in urls):
        return {"counts": [counts[Path(u).name] for u in urls], "classes": index.get("classes") or []}
    return None


def shard_images(data_path: str, split: str, labelled: bool) -> ShardImages:
    urls = shard_urls(data_path, split, labelled)
    index = _read_index(urls, split)
    if index is not None:
        counts, classes = index["counts"], list(index["classes"])
        if labelled and not classes:
            raise DataError(f"shard index {Path(urls[0]).parent / (split + '.json')} has no classes: "
                            f"the shards are unlabelled (tools/make_shards.py writes labels for class folders)")
    else:
        t0 = time.time()
        scans = [scan_shard(u, labelled) for u in urls]
        counts = [n for n, _ in scans]
        top = max((t for _, t in scans), default=0)
        if labelled and top == 0:
            raise DataError(f"--data_path {data_path}: the '{split}' shards hold no labels (.cls entries)")
        classes = [str(i) for i in range(top)] if labelled else []
        if os.environ.get("RANK", "0") == "0":
            print(f"note: no {split}.json index beside the shards: read the headers of {len(urls)} shards in "
                  f"{time.time() - t0:.1f} s (tools/make_shards.py writes the index)", flush=True)
    if not sum(counts):
        raise DataError(f"--data_path {data_path}: the '{split}' shards hold no samples")
    return ShardImages(urls, counts, classes, data_path)


def read_shard(url: str) -> Iterator[dict]:
    """Samples of one shard in stored order: {"__key__", "__url__", <ext>: bytes, ...}."""
    from webdataset.tariterators import tarfile_samples
    try:
        yield from tarfile_samples([{"url": url}])
    except Exception as e:  # a truncated or corrupt tar: name it
        raise DataError(f"shard {url} cannot be read: {type(e).__name__}: {e}") from None


def image_bytes(sample: dict) -> tuple[str, bytes]:
    for k in IMAGE_KEYS:
        if k in sample:
            return k, sample[k]
    raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image "
                    f"(entries: {', '.join(k for k in sample if not k.startswith('__'))})")


def label_of(sample: dict) -> int:
    c = sample.get("cls")
    return int(c.decode() if isinstance(c, bytes) else c) if c is not None else 0


def decode_sample(sample: dict, min_side: Optional[int], warned: set):
    _, data = image_bytes(sample)
    name = f"{sample.get('__key__')} in {sample.get('__url__')}"
    return decode_rgb(io.BytesIO(data), name, min_side, warned), label_of(sample)


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
        for s, first, end, pos in parts:
            url = self.images.urls[s]
            i = -1
            for i, sample in enumerate(read_shard(url)):
                if i >= end:
                    break
                if i >= first:
                    yield sample, pos + i - first
            else:
                if i + 1 < end:
                    raise DataError(f"shard {url} holds {i + 1} samples, its index says {self.images.counts[s]}")

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

    def collate(self, raw: list[tuple[dict, int]]):
        outs, labels, ok = [], [], []
        for sample, pos in raw:
            try:
                if self.raw:  # --decode fast / gpu: the transform decodes the bytes
                    _, data = image_bytes(sample)
                    img, label = Encoded(data, f"{sample.get('__key__')} in {sample.get('__url__')}"), label_of(sample)
                else:
                    img, label = decode_sample(sample, self.images.min_side, self._warned)
                outs.append(seeded_apply(self.transform, img, sample_seed(self.seed, self.epoch, pos)))
            except Exception as e:  # a corrupt image must not kill the run: name it, replace it below
                name = f"{sample.get('__key__')} in {sample.get('__url__')}"
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.warn(f"skipping unreadable image {name}: {type(e).__name__}: {e}")
                outs.append(None)
                labels.append(0)
                ok.append(0)
                continue
            labels.append(label)
            ok.append(1)
        good = [i for i, x in enumerate(outs) if x is not None]
        if not good:
            raise DataError(f"no image of a batch could be read (first: {raw[0][0].get('__key__')} in "
                            f"{raw[0][0].get('__url__')})")
        for i, x in enumerate(outs):
            if x is None:  # replaced by a readable image of the same batch, as an image folder does
                donor = good[i % len(good)]
                outs[i], labels[i] = outs[donor], labels[donor]
        labels, ok = torch.tensor(labels, dtype=torch.long), torch.tensor(ok, dtype=torch.long)
        return (torch.stack(outs) if isinstance(outs[0], torch.Tensor) else outs), labels, ok


def shard_loader(stream: ShardStream, num_workers: int, pin_memory: bool, worker_init_fn=None) -> DataLoader:
    """A DataLoader over a ShardStream (batches are collated in the workers). Workers are not kept
    between epochs: each epoch's workers start from the stream's new epoch and skip."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, worker_init_fn=worker_init_fn,
                      prefetch_factor=2 if num_workers else None)
