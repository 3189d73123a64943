"""The cost of pretraining's feature monitors (engine/monitor.py) against the training they watch.

    python tools/monitor_benchmark.py --model mae_swin_tiny_256 --batch_size 8 \
        --json benchmarks/cpu_monitor_cost_swin_t.json

In one process, in turns (train step, monitor batch, train step, ...), so drift of a shared machine
hits both alike: the median time per image of a full pretraining step (forward, backward, AdamW; the
recipe's masks, tools/benchmark.py) and of the monitor's forward (the classifier's encoder, eval mode,
no masking, no gradient); then, once, the k-NN (bank sharded as in a run, here one rank) and the
closed-form probe on random unit features of the monitor set's size.

From these and the data set sizes it projects the share of a run's compute that monitors take
every N epochs:

    point = monitor_images * t_forward + t_knn_and_probe
    epoch = train_images * t_train
    share(N) = point / (N * epoch + point)

Data loading is left out of both sides: a monitor image costs one decode and an evaluation crop, a
training image one decode and a random resized crop, so where loading dominates the share is near
monitor_images / (N * train_images). The checkpoint the loop writes before each monitor point (so that
a crash during it loses no training) is left out too: seconds, once per point.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import models
from engine.monitor import KNN_K, KNN_T, ridge_probe
from engine.record import write_report
from engine.step import autocast
from engine.knn import knn_accuracy
from tools import benchmark

FREQS = (1, 2, 5, 10, 20)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Cost of the pretraining feature monitors",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mae_swin_tiny_256", help="a pretraining model")
    p.add_argument("--batch_size", default=8, type=int)
    p.add_argument("--steps", default=5, type=int, help="timed turns (one train step and one monitor batch each)")
    p.add_argument("--warmup", default=1, type=int)
    p.add_argument("--amp", default="none", choices=["bf16", "fp16", "none"])
    p.add_argument("--device", default=None)
    p.add_argument("--train_images", default=1_281_167, type=int, help="images per training epoch (ImageNet-1k)")
    p.add_argument("--monitor_train", default=40_000, type=int,
                   help="monitor bank images (50 per class of 1000, less the val fifth)")
    p.add_argument("--monitor_val", default=10_000, type=int, help="monitor query images")
    p.add_argument("--classes", default=1000, type=int)
    p.add_argument("--target", default=5.0, type=float, help="largest acceptable share of the run (%%)")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def knn_and_probe_seconds(bank: int, queries: int, dim: int, classes: int, device: torch.device) -> float:
    """One monitor point's k-NN and probe on random unit features (the features' values do not change
    the work)."""
    gen = torch.Generator(device=device).manual_seed(0)
    fb = F.normalize(torch.randn(bank, dim, generator=gen, device=device), dim=1)
    fq = F.normalize(torch.randn(queries, dim, generator=gen, device=device), dim=1)
    lb = torch.randint(0, classes, (bank,), generator=gen, device=device)
    lq = torch.randint(0, classes, (queries,), generator=gen, device=device)
    _sync(device)
    t0 = time.perf_counter()
    knn_accuracy(fb, lb, fq, lq, classes, KNN_K, KNN_T)
    ridge_probe(fb, lb, fq, lq, classes)
    _sync(device)
    return time.perf_counter() - t0


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench_args = benchmark.get_args_parser().parse_args(
        ["--models", args.model, "--batch_size", str(args.batch_size), "--amp", args.amp])
    torch.manual_seed(0)
    entry = benchmark.build_entry(args.model, bench_args, device)
    size = int(entry.imgs.shape[-1])
    encoder = models.create_model(models.classifier_for(args.model), num_classes=0, img_size=size).to(device).eval()
    imgs = entry.imgs.clone()

    @torch.no_grad()
    def monitor_batch() -> None:
        with autocast(args.amp, device):
            encoder.forward_head(encoder.forward_features(imgs), pre_logits=True)

    train_t, fwd_t = [], []
    for i in range(args.warmup + args.steps):
        mask, sm = entry.draw()
        _sync(device)
        t0 = time.perf_counter()
        entry.step(args.amp, device, mask, sm)
        _sync(device)
        t1 = time.perf_counter()
        monitor_batch()
        _sync(device)
        t2 = time.perf_counter()
        if i >= args.warmup:
            train_t.append((t1 - t0) / args.batch_size)
            fwd_t.append((t2 - t1) / args.batch_size)
    t_train, t_fwd = statistics.median(train_t), statistics.median(fwd_t)
    dim = encoder.num_features
    t_knn = knn_and_probe_seconds(args.monitor_train, args.monitor_val, dim, args.classes, device)
    monitor_images = args.monitor_train + args.monitor_val
    point = monitor_images * t_fwd + t_knn
    epoch = args.train_images * t_train
    shares = {n: 100.0 * point / (n * epoch + point) for n in FREQS}
    fits = [n for n in FREQS if shares[n] < args.target]
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": benchmark.hardware(device), "threads": torch.get_num_threads(),
        "model": args.model, "classifier": models.classifier_for(args.model), "input_size": size,
        "batch_size": args.batch_size, "amp": args.amp, "steps": args.steps,
        "train_s_per_image": t_train, "monitor_forward_s_per_image": t_fwd,
        "forward_to_train_ratio": t_fwd / t_train, "knn_and_probe_s": t_knn, "feature_dim": dim,
        "train_images": args.train_images, "monitor_images": monitor_images, "classes": args.classes,
        "monitor_point_s": point, "epoch_s": epoch, "share_percent_by_freq": shares,
        "smallest_freq_under_target": fits[0] if fits else None, "target_percent": args.target,
    }


def markdown_table(r: dict) -> str:
    lines = [f"{r['model']} at {r['input_size']} px, batch {r['batch_size']}, amp {r['amp']}, "
             f"{r['hardware'].get('gpu') or r['hardware'].get('cpu')} ({r['threads']} threads)",
             "",
             "| quantity | value |", "|---|---|",
             f"| train step per image (fwd+bwd+AdamW) | {r['train_s_per_image'] * 1e3:.1f} ms |",
             f"| monitor forward per image | {r['monitor_forward_s_per_image'] * 1e3:.1f} ms "
             f"({r['forward_to_train_ratio']:.2f} x a train image) |",
             f"| k-NN + probe, {r['monitor_images']} images, D={r['feature_dim']} | {r['knn_and_probe_s']:.1f} s |",
             f"| one monitor point / one epoch of {r['train_images']} images | {r['monitor_point_s']:.0f} s / "
             f"{r['epoch_s']:.0f} s |",
             "", "| --monitor_freq | share of the run |", "|---|---|"]
    lines += [f"| {n} | {s:.2f}% |" for n, s in r["share_percent_by_freq"].items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    report = run(args)
    return write_report(report, markdown_table(report), args.json)


if __name__ == "__main__":
    main()
