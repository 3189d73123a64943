"""Convert an image data set into tar shards (webdataset format) for ``--data_path``.

    python tools/make_shards.py --data_path /path/to/ImageNet --output_dir /path/to/in1k-shards \
        --shard_size 1000

Input: any layout ``--data_path`` reads (ImageNet ``train/<class>/*`` and ``val/<class>/*``, the
reference's ``train.txt`` / ``val.txt`` lists, or for pretraining a plain folder of images).
Output, per split: ``<split>-000000.tar``, ... with ``--shard_size`` samples each, and
``<split>.json`` (samples per shard and the class names, webdataset's wids shard-index layout).
Each sample holds the image file's bytes unchanged (``<key>.jpg``, ``.png``, ...) and, for labelled
splits, ``<key>.cls`` (the class index, as ImageFolder / the list file gives it).

Training samples are shuffled once (``--seed``) before writing: the loader's per-epoch shuffle
permutes shards and mixes within a buffer, so shards must not hold one class each. Files that
cannot be read are named and left out; shards are written under a temporary name and renamed
when complete; the index is written last.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from errors import DataError  # noqa: E402
from imagedata.datasets import ImageList, image_list, report_left_out
from imagedata.shards import INDEX_KIND  # noqa: E402

EXT_NAMES = {"jpeg": "jpg", "tif": "tiff"}


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # tqdm comes with timm's dependencies; a plain counter otherwise
        class Plain:
            def __init__(self):
                self.n = 0

            def update(self, k):
                self.n += k
                if self.n % 1000 == 0 or self.n == total:
                    print(f"{desc}: {self.n}/{total}", file=sys.stderr, flush=True)

            def close(self):
                pass
        return Plain()


def write_split(images: ImageList, split: str, out: Path, shard_size: int, labelled: bool, shuffle: bool,
                seed: int) -> dict:
    """Write the shards and the index of one split; returns the index."""
    from webdataset import TarWriter
    order = list(range(len(images)))
    if shuffle:
        random.Random(seed).shuffle(order)
    shardlist, left_out = [], []
    bar = _progress(len(order), split)
    writer, tmp, count, size, written = None, None, 0, 0, 0

    def close_shard():
        nonlocal writer
        if writer is None:
            return
        writer.close()
        final = tmp.with_suffix("")
        os.replace(tmp, final)
        shardlist.append({"url": final.name, "nsamples": count, "filesize": final.stat().st_size})
        writer = None

    for i in order:
        path, label = images.samples[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            left_out.append((path, e.strerror or str(e)))
            bar.update(1)
            continue
        if writer is None:
            tmp = out / f"{split}-{len(shardlist):06d}.tar.tmp"
            writer, count, size = TarWriter(str(tmp)), 0, 0
        ext = Path(path).suffix.lower().lstrip(".")
        sample = {"__key__": f"{written:09d}", EXT_NAMES.get(ext, ext): data}
        if labelled:
            sample["cls"] = str(label).encode()
        writer.write(sample)
        count, size, written = count + 1, size + len(data), written + 1
        if count == shard_size:
            close_shard()
        bar.update(1)
    close_shard()
    bar.close()
    for path, reason in left_out:
        print(f"warning: left out {path}: {reason}", file=sys.stderr)
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "name": split, "shardlist": shardlist,
             "classes": images.classes or ([str(c) for c in range(max(l for _, l in images.samples) + 1)]
                                           if labelled else [])}
    tmp_index = out / f"{split}.json.tmp"
    tmp_index.write_text(json.dumps(index, indent=1))
    os.replace(tmp_index, out / f"{split}.json")
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", required=True, help="ImageNet layout, train.txt/val.txt lists, or a folder of images")
    p.add_argument("--output_dir", required=True, help="folder for <split>-NNNNNN.tar and <split>.json")
    p.add_argument("--splits", nargs="+", default=["train", "val"],
                   help="splits to convert (a missing val split is skipped with a note)")
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard (~110 MB of ImageNet JPEGs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle of training samples")
    p.add_argument("--no_shuffle", action="store_true", help="keep the listing order (evaluation splits always do)")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard_size must be >= 1, got {args.shard_size}")
    src, out = Path(args.data_path), Path(args.output_dir)
    if not src.is_dir():
        p.error(f"--data_path {src} does not exist or is not a folder")
    labelled = (src / "train").is_dir() or (src / "train.txt").is_file()
    jobs = []
    for split in args.splits:
        try:
            images = image_list(str(src), split, labelled=labelled or split != "train")
        except DataError as e:
            if split != "train":
                print(f"note: {split} skipped: {e}", file=sys.stderr)
                continue
            p.error(str(e))
        jobs.append((split, images))
    out.mkdir(parents=True, exist_ok=True)
    for split, _ in jobs:
        clash = sorted(out.glob(f"{split}-*.tar")) + ([out / f"{split}.json"] if (out / f"{split}.json").exists() else [])
        if clash:
            p.error(f"{out} already holds {split} shards ({clash[0].name}, ...): choose an empty --output_dir")
    for split, images in jobs:
        report_left_out(images)
        t0 = time.time()
        index = write_split(images, split, out, args.shard_size, labelled, split == "train" and not args.no_shuffle,
                            args.seed)
        n = sum(s["nsamples"] for s in index["shardlist"])
        gb = sum(s["filesize"] for s in index["shardlist"]) / 1e9
        print(f"{split}: {n} images in {len(index['shardlist'])} shards ({gb:.2f} GB, "
              f"{len(index['classes'])} classes) -> {out / (split + '-*.tar')} in {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
