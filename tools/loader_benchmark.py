"""Benchmark the pretraining data paths: images/s per worker and in total.

    python tools/loader_benchmark.py --images 256 --input_size 256 --workers 2 --json benchmarks/loader.json

Paths (each: read + decode + RandomResizedCrop(scale 0.2-1) + flip + normalise, ``--input_size`` px):

* ``folder+pil``  -- ImageFolder-style files, PIL in the workers (the default ``--decode pil``);
* ``shards+pil``  -- the same images in tar shards (tools/make_shards.py), PIL;
* ``shards+fast`` -- shards, ``--decode fast`` (simplejpeg, torch's uint8 resize);
* ``folder+fast`` -- files, ``--decode fast``;
* ``shards+gpu``  -- shards, ``--decode gpu`` (workers read bytes and draw crops; the main process decodes
  and crops on the GPU), only where CUDA is available.

Per worker: each path runs in this process (``num_workers=0``, one thread: what one DataLoader
worker does), the paths taking turns batch by batch (A, B, C, A, B, C, ...) for ``--rounds``
rounds, so slow drift of a shared machine hits every path alike; the figure is the median over
rounds and the ratios (row / ``folder+pil``) are the firm result. For ``shards+gpu`` the per-worker
figure is the worker's share (read bytes, header, draws) and the main-process GPU decode is timed
on its own. In total: a DataLoader with ``--workers`` workers per path, one pass after a warm-up
batch (and, for the GPU path, what the main process delivers on the device).

Images: ``--images`` generated JPEGs of ImageNet-like size (``--size`` 500x375, quality 90, a smooth
random scene plus sensor-like noise: ~100 KB each), or ``--data_dir`` (any folder of images).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from util.datasets import (SeededImageDataset, SeededSampler, image_list, needed_side,  # noqa: E402
                           pretrain_transform, PRETRAIN_SCALE)
from util.decode import GpuDecodeLoader, use_decoder, decode_planned  # noqa: E402
from util.run_record import cpu_name, write_report  # noqa: E402
from util.shards import ShardStream, shard_images, shard_loader  # noqa: E402

BASELINE = "folder+pil"


def generate(folder: Path, n: int, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        a = np.asarray(base, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def make_dataset(path: str, folder: Path, shards: Path, args, world_batch: int):
    source, decode = path.split("+")
    if source == "folder":
        images = image_list(str(folder), "train", labelled=False)
        images.min_side = needed_side(args.input_size, PRETRAIN_SCALE[0])
        ds = SeededImageDataset(images, pretrain_transform(args.input_size))
    else:
        images = shard_images(str(shards), "train", labelled=False)
        images.min_side = needed_side(args.input_size, PRETRAIN_SCALE[0])
        ds = ShardStream(images, pretrain_transform(args.input_size), world_batch, args.seed, train=True, buffer=64)
    collate = use_decoder(ds, decode, args.input_size)
    return ds, collate


def loader_for(ds, collate, workers: int, batch: int, seed: int, epoch: int = 0):
    if isinstance(ds, ShardStream):
        ds.set_epoch(epoch)
        return shard_loader(ds, workers, False)
    sampler = SeededSampler(ds, 1, 0, seed=seed)
    sampler.set_epoch(epoch)
    return DataLoader(ds, sampler=sampler, batch_size=batch, num_workers=workers, drop_last=True,
                      collate_fn=collate, persistent_workers=False)


def per_worker(paths: list[str], folder: Path, shards: Path, args) -> dict:
    """Median images/s of each path in this process (one thread), paths taking turns per batch."""
    torch.set_num_threads(1)
    its, rates = {}, {p: [] for p in paths}
    sets = {p: make_dataset(p, folder, shards, args, args.batch_size) for p in paths}
    epoch = {p: 0 for p in paths}

    def next_batch(p):
        while True:
            if p not in its:
                ds, collate = sets[p]
                its[p] = iter(loader_for(ds, collate, 0, args.batch_size, args.seed, epoch[p]))
            try:
                return next(its[p])
            except StopIteration:
                del its[p]
                epoch[p] += 1

    for p in paths:  # warm-up: imports, first files into the page cache
        next_batch(p)
    for _ in range(args.rounds):
        for p in paths:
            t0 = time.perf_counter()
            batch = next_batch(p)
            dt = time.perf_counter() - t0
            n = len(batch[0])
            rates[p].append(n / dt)
    return {p: statistics.median(r) for p, r in rates.items()}


def gpu_main_process(folder: Path, shards: Path, args, device: torch.device) -> float:
    """Images/s of the main process's share of --decode gpu (decode + crop + flip + normalise on the device)."""
    ds, _ = make_dataset("shards+gpu", folder, shards, args, args.gpu_batch)
    batches = [b[0] for _, b in zip(range(3), loader_for(ds, None, 0, args.gpu_batch, args.seed))]
    decode_planned(batches[0], args.input_size, device)  # warm-up (nvJPEG handles, kernels)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(args.rounds):
        for planned in batches:
            t0 = time.perf_counter()
            decode_planned(planned, args.input_size, device)
            torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) / len(planned))
    return 1.0 / statistics.median(times)


def total(path: str, folder: Path, shards: Path, args, device: Optional[torch.device]) -> float:
    """Images/s of a DataLoader with --workers workers over one pass (after its first batch)."""
    ds, collate = make_dataset(path, folder, shards, args, args.batch_size)
    loader = loader_for(ds, collate, args.workers, args.batch_size, args.seed)
    if path.endswith("gpu"):
        loader = GpuDecodeLoader(loader, args.input_size, device)
    n, t0 = 0, None
    for batch in loader:
        if t0 is None:
            t0 = time.perf_counter()  # (the first batch pays for starting the workers)
            continue
        n += len(batch[0])
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / max(time.perf_counter() - t0, 1e-9) if t0 is not None and n else float("nan")


def markdown_table(report: dict) -> str:
    head = ["path", "img/s per worker", f"x (vs {BASELINE})", f"img/s, {report['workers']} workers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        ratio = r["ratio_per_worker"]
        lines.append(f"| {r['path']} | {r['per_worker']:.1f} | {ratio:.2f} | "
                     + (f"{r['total']:.1f}" if r["total"] == r["total"] else "-") + " |")
    if report.get("gpu_main_process"):
        lines.append(f"| (shards+gpu: main process on {report['hardware'].get('gpu')}) | "
                     f"{report['gpu_main_process']:.1f} | | |")
    hw = report["hardware"]
    lines += ["", f"{hw['cpu']} ({hw['logical_cpus']} logical CPUs); {report['images']} images "
                  f"{report['image_desc']}; {report['input_size']} px crops, batch {report['batch_size']}; per worker: "
                  f"median of {report['rounds']} interleaved batches in one process, one thread; total: one pass "
                  f"with {report['workers']} DataLoader workers"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default=None, help="a folder of images (default: generate --images JPEGs)")
    p.add_argument("--images", type=int, default=256, help="JPEGs to generate")
    p.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"), help="generated size")
    p.add_argument("--input_size", type=int, default=256, help="crop size")
    p.add_argument("--batch_size", type=int, default=16, help="images per batch")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers for the totals")
    p.add_argument("--rounds", type=int, default=12, help="interleaved batches per path (per-worker figures)")
    p.add_argument("--paths", nargs="+", default=None,
                   help="subset of folder+pil shards+pil shards+fast folder+fast shards+gpu")
    p.add_argument("--gpu_batch", type=int, default=128, help="batch of the GPU path's main-process timing")
    p.add_argument("--no_totals", action="store_true", help="per-worker figures only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    valid = ["folder+pil", "shards+pil", "shards+fast", "folder+fast"] + (["shards+gpu"] if cuda else [])
    paths = args.paths or valid
    bad = [x for x in paths if x not in valid]
    if bad:
        p.error(f"--paths {bad[0]}: valid here: {', '.join(valid)}" + ("" if cuda else " (shards+gpu needs CUDA)"))
    if BASELINE not in paths:
        paths = [BASELINE] + paths
    device = torch.device("cuda") if cuda else None
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        tmp = Path(tmp)
        if args.data_dir:
            folder = Path(args.data_dir)
            desc = f"from {folder}"
        else:
            folder = tmp / "images"
            generate(folder, args.images, tuple(args.size), args.seed)
            desc = f"{args.size[0]}x{args.size[1]} JPEG q90 (generated)"
        images = image_list(str(folder), "train", labelled=False)
        kb = statistics.mean(os.path.getsize(s) for s, _ in images.samples[:200]) / 1024
        desc += f", {kb:.0f} KB on average"
        from tools.make_shards import new_plan, write_split
        shards = tmp / "shards"
        shards.mkdir()
        import contextlib
        with contextlib.redirect_stderr(io.StringIO()):
            write_split(images, "train", shards, new_plan(images, "train", folder, 64, False, args.seed, True))
        cpu_paths = [x for x in paths if not x.endswith("gpu")]
        rates = per_worker(cpu_paths + (["shards+gpu"] if "shards+gpu" in paths else []), folder, shards, args)
        gpu_rate = gpu_main_process(folder, shards, args, device) if "shards+gpu" in paths else None
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        totals = {x: (float("nan") if args.no_totals else total(x, folder, shards, args, device)) for x in paths}
    base = rates[BASELINE]
    rows = [{"path": x, "per_worker": rates[x], "ratio_per_worker": rates[x] / base, "total": totals[x]}
            for x in paths]
    hw = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_name(),
          "logical_cpus": os.cpu_count()}
    if cuda:
        hw["gpu"] = torch.cuda.get_device_name()
    report = {"hardware": hw, "torch": torch.__version__,
              "command": " ".join(shlex.quote(a) for a in ["python", "tools/loader_benchmark.py"] + argv),
              "images": len(images), "image_desc": desc, "input_size": args.input_size, "batch_size": args.batch_size,
              "workers": args.workers, "rounds": args.rounds, "interleaved": True, "baseline": BASELINE,
              "ratio_definition": f"row / {BASELINE}, images/s per worker (above 1: faster)",
              "gpu_main_process": gpu_rate, "results": rows}
    return write_report(report, markdown_table(report), args.json)


if __name__ == "__main__":
    main()
