"""Benchmark UperNet + FCN training steps on our backbones: step time, peak memory, saved activations.

    python tools/benchmark_segmentation.py --models swin_tiny_256 pvt_small_256 --batch_size 2 --input_size 512
    python tools/benchmark_segmentation.py --device cuda --amp bf16 --batch_size 2     # on a GPU

Each model runs in its own child process (so that the CPU peak resident memory is its own), on
synthetic images and labels (150 classes, 5% ignored), with the programs' settings: AdamW (fused),
oneDNN linear layers on CPU (``setup_cpu_training``, but the malloc setting left alone, so that
the peak is not the retained heap), the reference head sizes. ``--warmup`` untimed steps, then the
median of ``--steps`` timed full training steps (forward, backward, optimizer step).

Memory: CPU, the child's peak resident set (``ru_maxrss``, everything: weights, optimizer state,
activations, allocator slack); GPU, ``max_memory_allocated``. Saved activations: the bytes of the
tensors autograd keeps for backward in one training forward (unique storages, parameters excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine.record import cpu_name


def saved_activation_bytes(model, imgs, labels) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model(imgs, labels)
    del loss
    return sum(seen.values())


def child(args) -> dict:
    from util.pretrained import build_backbone
    from segmentation.heads import SegmentationModel
    from engine.cpu_perf import setup_cpu_training
    from engine.optim import fused_optimizer_ok
    from engine.step import autocast
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = build_backbone(args.model, drop_path=0.1, img_size=args.input_size)
    model = SegmentationModel(backbone, 150).to(device).train()
    # malloc left alone: on a shared machine the retained heap would inflate the peak it measures
    note = setup_cpu_training(model, device, args.cpu_matmul, compiled=False, malloc=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05,
                            fused=fused_optimizer_ok(device) or None)
    n = args.batch_size
    imgs = torch.randn(n, 3, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, 150, (n, args.input_size, args.input_size), device=device)
    labels[torch.rand(labels.shape, device=device) < 0.05] = 255
    saved = saved_activation_bytes(model, imgs, labels)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast(args.amp, device):
            loss, _ = model(imgs, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"model": args.model, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "backbone_params_m": sum(p.numel() for p in backbone.parameters()) / 1e6,
            "step_s_median": statistics.median(times), "step_s_all": times,
            "images_per_s": n / statistics.median(times), "peak_mem_mb": peak / 2 ** 20,
            "saved_activations_mb": saved / 2 ** 20, "cpu_settings": note, "final_loss": float(loss)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["swin_tiny_256", "pvt_small_256"])
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--input_size", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--cpu_matmul", default="onednn", choices=["onednn", "aten"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--json", default="benchmarks/seg_cpu_upernet_b2.json")
    p.add_argument("--model", help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        print(json.dumps(child(args)))
        return 0
    rows = []
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "rows": rows,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "cpu_model": cpu_name() or ""}
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        cmd = [sys.executable, __file__, "--model", name] + [
            a for a in sys.argv[1:] if a not in args.models and a != "--models"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if out.returncode:
            print(f"{name}: child failed with status {out.returncode}" + (" (killed: out of memory?)"
                  if out.returncode < 0 else "") + f"\n{out.stderr}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        record["load_average"] = os.getloadavg()
        out_json.write_text(json.dumps(record, indent=1))  # after every model: a long run keeps what it measured
    print(f"UperNet + FCN, {args.input_size} px, batch {args.batch_size}, {args.device}, amp {args.amp}, "
          f"median of {args.steps} steps")
    print(f"{'backbone':16s} {'params M':>9s} {'step s':>8s} {'img/s':>7s} {'peak MB':>9s} {'saved act MB':>13s}")
    for r in rows:
        print(f"{r['model']:16s} {r['params_m']:9.2f} {r['step_s_median']:8.3f} {r['images_per_s']:7.2f} "
              f"{r['peak_mem_mb']:9.0f} {r['saved_activations_mb']:13.0f}")
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
