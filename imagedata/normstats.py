"""Per-channel normalisation statistics: ``--norm_stats imagenet | auto | FILE``.

* ``imagenet``: the reference's (3 channels only);
* ``auto``: the mean and std of each channel over a seeded sample of the training set (``AUTO_SAMPLES``
  images, whole images as the data path reads them, before any augmentation), computed in float64;
  cached as ``norm_stats.json`` in the output folder, reused while the data set, channels, sample
  size and seed are the same;
* ``FILE``: a JSON file ``{"mean": [...], "std": [...]}`` (what ``auto`` writes is one).

The statistics are of the values the model's data path produces before normalising: 8-bit RGB as
ToTensor scales it (/ 255) with 3 channels, ``imagedata.channels.to_tensor`` otherwise. A run keeps
them in its config (``norm_mean``, ``norm_std``), so its checkpoints and its run record carry them
(engine.checkpoint.stored_pixels reads them back); finetuning, k-NN, the linear probe,
reconstruction and export take them from the checkpoint unless ``--norm_stats`` says otherwise.
"""
from __future__ import annotations

import io
import json
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np

from errors import DataError, UsageError
from imagedata.channels import Pixels, mismatch, read_array, to_tensor
from imagedata.images import IMAGENET_MEAN, IMAGENET_STD, decode_rgb

AUTO_SAMPLES = 512          # images the auto statistics read (all of a smaller set)
CACHE_NAME = "norm_stats.json"
CHOICES = ("imagenet", "auto", "FILE")
MIN_STD = 1e-6              # a constant channel is divided by this, not by 0


def _listing_key(images) -> str:
    """What identifies the data set the statistics are of: its size and first and last names."""
    n = len(images)
    names = [images.samples[i][0] for i in (0, n - 1)] if hasattr(images, "samples") and n else []
    return f"{getattr(images, 'source', '')}|{n}|{'|'.join(map(str, names))}"


def sample_indices(n: int, samples: int, seed: int) -> list[int]:
    """The images the statistics read: ``samples`` of ``range(n)`` drawn with ``seed`` (all when fewer)."""
    if n <= samples:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), samples))


def _values(images, index: int, in_chans: int) -> np.ndarray:
    """One image's values as the data path scales them, (C, H*W) float64."""
    data, name = images.raw_bytes(index)
    if in_chans == 3:  # the RGB path: 8-bit RGB, / 255 (imagedata.images.decode_rgb)
        rgb = np.asarray(decode_rgb(io.BytesIO(data), name, None, set()), dtype=np.float64) / 255.0
        return rgb.reshape(-1, 3).T
    arr = read_array(data, name)
    if arr.shape[2] != in_chans:
        raise mismatch(name, arr.shape[2], in_chans)
    return to_tensor(arr).double().reshape(in_chans, -1).numpy()


def compute(images, in_chans: int, seed: int, samples: int = AUTO_SAMPLES, log=print) -> Pixels:
    """Per-channel mean and std over a seeded sample of ``images`` (an ImageList or ShardImages),
    with a progress line every few seconds. Unreadable images are left out (and counted)."""
    picks = sample_indices(len(images), samples, seed)
    total = np.zeros(in_chans)
    squares = np.zeros(in_chans)
    count = 0
    failed = 0
    start = last = time.monotonic()
    for k, i in enumerate(picks):
        try:
            v = _values(images, i, in_chans)
        except DataError:
            raise
        except Exception:
            failed += 1
            continue
        mean = v.mean(axis=1)   # per image first (no float64 sum over billions of values loses digits)
        total += mean * v.shape[1]
        squares += ((v - mean[:, None]) ** 2).sum(axis=1) + mean ** 2 * v.shape[1]
        count += v.shape[1]
        now = time.monotonic()
        if now - last > 5 or k + 1 == len(picks):
            last = now
            log(f"norm stats: {k + 1}/{len(picks)} images ({now - start:.0f} s)")
    if not count:
        raise DataError(f"--norm_stats auto: none of the {len(picks)} sampled images could be read")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    if failed:
        log(f"norm stats: {failed} of {len(picks)} sampled images could not be read and were left out")
    return Pixels(in_chans, tuple(float(m) for m in mean), tuple(float(max(s, MIN_STD)) for s in std))


def read_file(path: str | os.PathLike, in_chans: int) -> Pixels:
    """Statistics from a JSON file ``{"mean": [...], "std": [...]}`` with ``in_chans`` entries each."""
    try:
        obj = json.loads(Path(path).read_text())
        mean, std = [float(x) for x in obj["mean"]], [float(x) for x in obj["std"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--norm_stats {path}: not a JSON file of {{\"mean\": [...], \"std\": [...]}} "
                         f"({type(e).__name__}: {e})") from None
    if len(mean) != in_chans or len(std) != in_chans:
        raise UsageError(f"--norm_stats {path} has {len(mean)} means and {len(std)} stds, the model takes "
                         f"--in_chans {in_chans}")
    if min(std) <= 0:
        raise UsageError(f"--norm_stats {path}: every std must be > 0, got {std}")
    return Pixels(in_chans, tuple(mean), tuple(std))


def check_spec(spec: str, in_chans: int) -> None:
    """What the flag alone can tell: a choice or an existing file; ImageNet's statistics are RGB's."""
    if spec in ("imagenet", "auto"):
        if spec == "imagenet" and in_chans != 3:
            raise UsageError(f"--norm_stats imagenet has 3 channels, the model takes --in_chans {in_chans}: "
                             f"use --norm_stats auto or a FILE")
        return
    if not Path(spec).is_file():
        raise UsageError(f"--norm_stats {spec!r}: valid choices are imagenet, auto or an existing JSON FILE")


def resolve_stats(spec: str, images, in_chans: int, seed: int, cache_dir: Optional[str | os.PathLike],
                  log=print) -> Pixels:
    """The statistics ``spec`` names for a run on ``images`` (auto: from the cache in ``cache_dir`` when
    it is of the same data, channels, sample size and seed; else computed and cached there)."""
    check_spec(spec, in_chans)
    if spec == "imagenet":
        return Pixels(3, IMAGENET_MEAN, IMAGENET_STD)
    if spec != "auto":
        return read_file(spec, in_chans)
    key = {"data": _listing_key(images), "in_chans": in_chans, "samples": AUTO_SAMPLES, "seed": seed}
    cache = Path(cache_dir) / CACHE_NAME if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return Pixels(in_chans, tuple(saved["mean"]), tuple(saved["std"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache is computed again
    pixels = compute(images, in_chans, seed, log=log)
    if cache is not None:
        write_stats(pixels, cache, key)
        log(f"norm stats: {cache}")
    return pixels


def write_stats(pixels: Pixels, path: Path, key: Optional[dict] = None) -> None:
    """The statistics as JSON (what FILE reads), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"mean": list(pixels.mean), "std": list(pixels.std), "key": key}, indent=1) + "\n")
    os.replace(tmp, path)


def describe(pixels: Pixels) -> str:
    """One line for logs: the channels and the statistics."""
    fmt = lambda xs: "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"  # noqa: E731
    return f"{pixels.in_chans} channel{'s' if pixels.in_chans != 1 else ''}, mean {fmt(pixels.mean)}, std {fmt(pixels.std)}"


def run_pixels(config, list_images, log=print) -> Pixels:
    """A run's channels and statistics (a config with the section of config.channels): those it already
    holds (a checkpoint's), else what its ``--norm_stats`` names. ``list_images()`` lists the training
    set; it is called only for ``auto`` (a large data set is listed once more only when asked)."""
    if config.norm_mean:
        return Pixels(config.in_chans, tuple(config.norm_mean), tuple(config.norm_std))
    images = list_images() if config.norm_stats == "auto" else None
    return resolve_stats(config.norm_stats, images, config.in_chans, config.seed, config.output_dir, log)
