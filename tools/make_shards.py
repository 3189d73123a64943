"""Convert an image data set into tar shards (webdataset format) for ``--data_path``.

    python tools/make_shards.py --data_path /path/to/ImageNet --output_dir /path/to/in1k-shards \
        --shard_size 1000

Input: any layout ``--data_path`` reads (ImageNet ``train/<class>/*`` and ``val/<class>/*``, the
reference's ``train.txt`` / ``val.txt`` lists, or for pretraining a plain folder of images).
Output, per split: ``<split>-000000.tar``, ... with ``--shard_size`` samples each, and
``<split>.json`` (samples per shard and the class names, webdataset's wids shard-index layout).
Each sample holds the image file's bytes unchanged (``<key>.jpg``, ``.png``, ``.tiff``, ``.npy``, ...)
and, for labelled splits, ``<key>.cls`` (the class index, as ImageFolder / the list file gives it):
16-bit PNGs, float TIFFs and ``.npy`` arrays keep their dtype (no 8-bit round trip; ``--in_chans``).

Training samples are shuffled once (``--seed``) before writing: the loader's per-epoch shuffle
permutes shards and mixes within a buffer, so shards must not hold one class each. Files that
cannot be read are named and left out.

Safe to interrupt: the output folder is locked for the run (engine/output_lock.py: a second
conversion into it is refused, naming the first); ``<split>.incomplete.json`` records the plan and
every finished shard, shards are written under a temporary name (``.<split>-NNNNNN.tar.*.tmp``)
and renamed when complete, the index is written last and the record removed after it. The loader
refuses a split whose record remains. ``--resume`` finishes an interrupted conversion: it checks
that the source and flags are the same, keeps the finished shards and writes the rest, giving the
shards an uninterrupted conversion gives. ``--reindex`` rewrites the indexes of existing shards from
their tar headers.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import output_lock  # noqa: E402
from errors import DataError, UsageError  # noqa: E402
from imagedata.datasets import ImageList, image_list, report_left_out  # noqa: E402
from imagedata.shards import INDEX_KIND, incomplete_marker, is_shard_spec, scan_shard, shard_urls  # noqa: E402

EXT_NAMES = {"jpeg": "jpg", "tif": "tiff"}
PLAN_VERSION = 1


def _progress(total: int, desc: str, done: int = 0):
    try:
        from tqdm import tqdm
        return tqdm(total=total, initial=done, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # tqdm comes with timm's dependencies; a plain counter otherwise
        class Plain:
            def __init__(self):
                self.n = done

            def update(self, k):
                self.n += k
                if self.n % 1000 == 0 or self.n == total:
                    print(f"{desc}: {self.n}/{total}", file=sys.stderr, flush=True)

            def close(self):
                pass
        return Plain()


def _file_mode() -> int:
    """The mode an ordinary new file gets (mkstemp makes 0600; shards are read by other users' jobs)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write_json(obj: dict, path: Path) -> None:
    """Atomically (a temporary file, fsync-ed, renamed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _listing_digest(images: ImageList) -> str:
    h = hashlib.sha256()
    for path, label in images.samples:
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()[:16]


def new_plan(images: ImageList, split: str, src: Path, shard_size: int, shuffle: bool, seed: int,
             labelled: bool) -> dict:
    """What decides the shards' content: the source listing and the flags; plus the progress so far."""
    return {"version": PLAN_VERSION, "split": split, "data_path": str(src.resolve()), "images": len(images),
            "listing": _listing_digest(images), "shard_size": shard_size, "shuffle": shuffle, "seed": seed,
            "labelled": labelled, "shardlist": [], "next": 0, "written": 0, "left_out": []}


def _plan_differences(saved: dict, plan: dict) -> list[str]:
    keys = ("version", "data_path", "images", "listing", "shard_size", "shuffle", "seed", "labelled")
    return [f"{k} {saved.get(k)!r} -> {plan[k]!r}" for k in keys if saved.get(k) != plan[k]]


def _temporaries(out: Path, split: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(out / f".{split}-*.tmp")) + glob.glob(str(out / f"{split}-*.tar.tmp")))


def prepare_resume(plan: dict, out: Path, split: str) -> dict:
    """Continue from ``<split>.incomplete.json``: the same source and flags, the finished shards
    intact; temporary files and shards written after the last record are removed (rewritten)."""
    marker = incomplete_marker(out, split)
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume: {marker} cannot be read ({type(e).__name__}: {e}): convert again into an "
                         f"empty folder") from None
    diffs = _plan_differences(saved, plan)
    if diffs:
        raise UsageError(f"--resume: {out} was being written from another source or with other flags "
                         f"({'; '.join(diffs)}): resume with the same --data_path, --shard_size, --seed and "
                         f"shuffling, or convert into an empty folder")
    for entry in saved["shardlist"]:
        path = out / entry["url"]
        size = path.stat().st_size if path.is_file() else None
        if size != entry["filesize"]:
            raise UsageError(f"--resume: shard {path} is {'missing' if size is None else f'{size} bytes'}, its "
                             f"record says {entry['filesize']} bytes: convert again into an empty folder")
    recorded = {e["url"] for e in saved["shardlist"]}
    for path in _temporaries(out, split) + [Path(p) for p in glob.glob(str(out / f"{split}-*.tar"))]:
        if path.name not in recorded:
            path.unlink()
    return saved


def write_split(images: ImageList, split: str, out: Path, plan: dict) -> dict:
    """Write the shards (from where ``plan`` got to) and the index of one split; returns the index."""
    from webdataset import TarWriter
    order = list(range(len(images)))
    if plan["shuffle"]:
        random.Random(plan["seed"]).shuffle(order)
    marker = incomplete_marker(out, split)
    _write_json(plan, marker)
    bar = _progress(len(order), split, plan["next"])
    i, written = plan["next"], plan["written"]
    while i < len(order):
        k = len(plan["shardlist"])
        fd, tmp = tempfile.mkstemp(prefix=f".{split}-{k:06d}.tar.", suffix=".tmp", dir=out)
        count, left_out = 0, []
        try:
            os.fchmod(fd, _file_mode())
            with os.fdopen(fd, "wb") as f:
                writer = TarWriter(f, mtime=0)  # fixed header times: a resumed conversion writes the same bytes
                while i < len(order) and count < plan["shard_size"]:
                    path, label = images.samples[order[i]]
                    i += 1
                    bar.update(1)
                    try:
                        with open(path, "rb") as src:
                            data = src.read()
                    except OSError as e:
                        left_out.append([path, e.strerror or str(e)])
                        continue
                    ext = Path(path).suffix.lower().lstrip(".")
                    sample = {"__key__": f"{written:09d}", EXT_NAMES.get(ext, ext): data}
                    if plan["labelled"]:
                        sample["cls"] = str(label).encode()
                    writer.write(sample)
                    count, written = count + 1, written + 1
                writer.close()
                f.flush()
                os.fsync(f.fileno())
            if count:
                final = out / f"{split}-{k:06d}.tar"
                os.replace(tmp, final)
                plan["shardlist"].append({"url": final.name, "nsamples": count, "filesize": final.stat().st_size})
            else:  # the last files were all unreadable
                os.unlink(tmp)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        plan.update(next=i, written=written, left_out=plan["left_out"] + left_out)
        _write_json(plan, marker)
    bar.close()
    for path, reason in plan["left_out"]:
        print(f"warning: left out {path}: {reason}", file=sys.stderr)
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "name": split, "shardlist": plan["shardlist"],
             "classes": images.classes or ([str(c) for c in range(max(l for _, l in images.samples) + 1)]
                                           if plan["labelled"] else [])}
    _write_json(index, out / f"{split}.json")
    marker.unlink()
    return index


def reindex(out: Path, splits: list[str]) -> int:
    """Rewrite ``<split>.json`` from the shards' tar headers (sizes and counts), keeping class names."""
    done = 0
    for split in splits:
        try:
            urls = shard_urls(str(out), split, labelled=split != "train")
        except DataError as e:
            print(f"note: {split} skipped: {e}", file=sys.stderr)
            continue
        old = out / f"{split}.json"
        try:
            classes = json.loads(old.read_text()).get("classes") or [] if old.is_file() else []
        except (OSError, ValueError, AttributeError):
            classes = []
        scans = [scan_shard(u, labelled=True) for u in urls]
        top = max((t for _, t in scans), default=0)
        if len(classes) < top:
            classes = [str(c) for c in range(top)]
        shardlist = [{"url": Path(u).name, "nsamples": n, "filesize": os.stat(u).st_size}
                     for u, (n, _) in zip(urls, scans)]
        _write_json({"__kind__": INDEX_KIND, "wids_version": 1, "name": split, "shardlist": shardlist,
                     "classes": classes}, old)
        print(f"{split}: index rewritten from {len(urls)} shards ({sum(n for n, _ in scans)} samples, "
              f"{len(classes)} classes) -> {old}", flush=True)
        done += 1
    if not done:
        raise UsageError(f"--reindex: {out} holds no shards of {', '.join(splits)}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", default=None,
                   help="ImageNet layout, train.txt/val.txt lists, or a folder of images (required unless --reindex)")
    p.add_argument("--output_dir", required=True, help="folder for <split>-NNNNNN.tar and <split>.json")
    p.add_argument("--splits", nargs="+", default=["train", "val"],
                   help="splits to convert (a missing val split is skipped with a note)")
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard (~110 MB of ImageNet JPEGs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle of training samples")
    p.add_argument("--no_shuffle", action="store_true", help="keep the listing order (evaluation splits always do)")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted conversion into --output_dir (same --data_path and flags)")
    p.add_argument("--reindex", action="store_true",
                   help="rewrite the <split>.json indexes of the shards in --output_dir from their tar headers")
    args = p.parse_args(argv)
    try:
        return run(args)
    except (UsageError, DataError) as e:  # one line, as a flag error, without the usage text
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    out = Path(args.output_dir)
    if args.reindex:
        if not out.is_dir():
            raise UsageError(f"--reindex: --output_dir {out} does not exist")
        lock = output_lock.acquire(out, "make_shards.py --reindex")
        try:
            return reindex(out, args.splits)
        finally:
            lock.release()
    if args.data_path is None:
        raise UsageError("--data_path is required (the image folder to convert)")
    if args.shard_size < 1:
        raise UsageError(f"--shard_size must be >= 1, got {args.shard_size}")
    src = Path(args.data_path)
    if not src.is_dir():
        raise UsageError(f"--data_path {src} does not exist or is not a folder")
    if is_shard_spec(str(src)):
        raise UsageError(f"--data_path {src} holds tar shards already: make_shards.py converts image folders "
                         f"(ImageNet layout, train.txt/val.txt lists, or a folder of images); the programs read "
                         f"these shards as they are")
    labelled = (src / "train").is_dir() or (src / "train.txt").is_file()
    jobs = []
    for split in args.splits:
        try:
            images = image_list(str(src), split, labelled=labelled or split != "train")
        except DataError as e:
            if split != "train":
                print(f"note: {split} skipped: {e}", file=sys.stderr)
                continue
            raise UsageError(str(e)) from None
        jobs.append((split, images))
    lock = output_lock.acquire(out, "make_shards.py")  # one conversion at a time into a folder
    try:
        plans = []
        for split, images in jobs:
            plan = new_plan(images, split, src, args.shard_size, split == "train" and not args.no_shuffle,
                            args.seed, labelled or split != "train")
            marker, index = incomplete_marker(out, split), out / f"{split}.json"
            if marker.is_file():
                if not args.resume:
                    raise UsageError(f"{out} holds an interrupted conversion of {split} ({marker.name}): add "
                                     f"--resume to finish it, or choose an empty --output_dir")
                plan = prepare_resume(plan, out, split)
            elif index.is_file() and args.resume:
                print(f"note: {split} is complete ({index.name}); nothing to resume", flush=True)
                continue
            else:
                clash = sorted(out.glob(f"{split}-*.tar")) + _temporaries(out, split) + \
                    ([index] if index.exists() else [])
                if clash:
                    raise UsageError(f"{out} already holds {split} shards ({clash[0].name}, ...): choose an empty "
                                     f"--output_dir")
            plans.append((split, images, plan))
        for split, images, plan in plans:
            if not plan["next"]:
                report_left_out(images)
            elif plan["next"] < len(images):
                print(f"{split}: resuming after {len(plan['shardlist'])} shards ({plan['next']} of {len(images)} "
                      f"files)", flush=True)
            t0 = time.time()
            index = write_split(images, split, out, plan)
            n = sum(s["nsamples"] for s in index["shardlist"])
            gb = sum(s["filesize"] for s in index["shardlist"]) / 1e9
            print(f"{split}: {n} images in {len(index['shardlist'])} shards ({gb:.2f} GB, "
                  f"{len(index['classes'])} classes) -> {out / (split + '-*.tar')} in {time.time() - t0:.1f} s",
                  flush=True)
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
