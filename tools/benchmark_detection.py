"""CPU step time and memory of the detectors: GFL and Mask R-CNN on Swin-T and PVT-S; and the time
Mask R-CNN evaluation spends per image turning detections into COCO results.

    python tools/benchmark_detection.py --size 512 --batch 2 --steps 5 --out benchmarks/cpu_detection_512_b2.json
    python tools/benchmark_detection.py --postprocess 20 --out benchmarks/cpu_mask_postprocess.json

One training step = forward (losses) + backward + AdamW step on a fixed synthetic batch
(``--batch`` images of ``--size`` px, 4 boxes with masks each, 80 classes, the recipe's
widths: adapters 768, FPN 256). Each configuration runs in its own process, so the peak
resident memory (ru_maxrss) is its own; the time is the median of ``--steps`` steps after
one warm-up step. Prints a table, writes JSON with the command and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("gfl", "swin_tiny_256"), ("gfl", "pvt_small_256"), ("mask_rcnn", "swin_tiny_256"),
           ("mask_rcnn", "pvt_small_256")]


def one(detector: str, model: str, size: int, batch: int, steps: int, threads: int) -> dict:
    import resource

    import torch
    sys.path.insert(0, str(ROOT))
    from util.pretrained import build_backbone
    from detection.detector import build_detector
    from engine.cpu_perf import setup_cpu_training
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    det = build_detector(detector, build_backbone(model), 80).train()
    setup_cpu_training(det, torch.device("cpu"), "onednn", compiled=False)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, size, size, generator=g)
    targets = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = 32 + torch.rand(4, 2, generator=g) * size * 0.35
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        masks = torch.zeros(4, size, size, dtype=torch.uint8)
        for m, b in zip(masks, boxes.long()):
            m[b[1]:b[3], b[0]:b[2]] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(0, 80, (4,), generator=g), "masks": masks})
    sizes = [(size, size)] * batch
    opt = torch.optim.AdamW(det.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = sum(det(imgs, sizes, targets).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return {"detector": detector, "backbone": model, "size": size, "batch": batch, "threads": threads,
            "params_m": sum(p.numel() for p in det.parameters()) / 1e6,
            "step_ms_median": 1000 * statistics.median(times), "step_ms_all": [1000 * t for t in times],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def synthetic_detections(n_images: int, dets: int = 100, orig=(480, 640), seed: int = 0):
    """Mask R-CNN outputs for COCO's typical 640 x 480 image tested at 1067 x 800: ``dets`` boxes with
    COCO's mix of sizes (side ~ log-uniform 8-600 px of the input) and (dets, 1, 28, 28) mask
    probabilities (smooth blobs). Yields (det, meta)."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    h0, w0 = orig
    s = min(1333 / max(h0, w0), 800 / min(h0, w0))
    h, w = int(h0 * s + 0.5), int(w0 * s + 0.5)
    for _ in range(n_images):
        side = torch.exp(torch.empty(dets, 2).uniform_(2.1, 6.4, generator=g))
        xy = torch.rand(dets, 2, generator=g) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + side], 1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        logits = F.interpolate(torch.randn(dets, 1, 7, 7, generator=g) * 3, size=(28, 28), mode="bilinear")
        det = {"boxes": boxes, "scores": torch.rand(dets, generator=g), "labels": torch.randint(0, 80, (dets,), generator=g),
               "masks": logits.sigmoid()}
        yield det, {"image_id": 1, "orig_size": (h0, w0), "size": (h, w), "scale": (h / h0, w / w0)}


def postprocess(n_images: int, threads: int) -> dict:
    """Median seconds per image of detection.coco.to_coco_results with masks (paste at the original size,
    threshold, RLE), on this CPU with ``threads`` threads: wall clock, and this process's CPU time
    (which a machine shared with other work inflates less)."""
    import statistics

    import torch
    sys.path.insert(0, str(ROOT))
    from detection.coco import to_coco_results
    torch.set_num_threads(threads)
    times, cpu = [], []
    for det, meta in synthetic_detections(n_images):
        t, c = time.perf_counter(), time.process_time()
        to_coco_results(det, meta, list(range(1, 81)), True)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"images": n_images, "detections_per_image": 100, "orig_size": [480, 640], "test_size": [800, 1067],
            "threads": threads, "seconds_per_image_median": statistics.median(times),
            "cpu_seconds_per_image_median": statistics.median(cpu), "seconds_all": times}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only", default=None, help="detector:backbone, e.g. gfl:swin_tiny_256 (default: all four)")
    p.add_argument("--out", default=None)
    p.add_argument("--postprocess", type=int, default=0, metavar="IMAGES",
                   help="instead: time Mask R-CNN's evaluation post-processing on this many synthetic images")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.postprocess:
        r = postprocess(a.postprocess, a.threads)
        print(f"Mask R-CNN post-processing (100 masks, 640x480 image tested at 1067x800, {a.threads} threads): "
              f"{r['seconds_per_image_median'] * 1000:.0f} ms per image, {r['cpu_seconds_per_image_median'] * 1000:.0f} "
              f"ms of CPU (medians of {a.postprocess})")
        if a.out:
            import torch
            Path(a.out).write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                               "machine": platform.processor() or platform.machine(),
                                               "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                                               "torch": torch.__version__, **r}, indent=1))
        return 0
    if a._child:
        d, m = a.only.split(":")
        print(json.dumps(one(d, m, a.size, a.batch, a.steps, a.threads)))
        return 0
    configs = [tuple(a.only.split(":"))] if a.only else CONFIGS
    rows = []
    for d, m in configs:
        cmd = [sys.executable, __file__, "--_child", "--only", f"{d}:{m}", "--size", str(a.size), "--batch",
               str(a.batch), "--steps", str(a.steps), "--threads", str(a.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{d:10s} {m:15s} {r['params_m']:7.1f}M  step {r['step_ms_median']:8.0f} ms  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
        meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.processor() or
                platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                "torch": __import__("torch").__version__, "rows": rows}
        if a.out:  # after every row: a long run cut short keeps what it measured
            Path(a.out).write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
