"""Full-scale costs of the dense recipes (GFL on COCO, UperNet on ADE20K), measured without a GPU.

    python tools/dense_costs.py model --out benchmarks/dense_costs_model.json
    python tools/make_tiny_coco.py --out /tmp/coco_full --synthetic 118287 860001
    python tools/dense_costs.py host --coco /tmp/coco_full --out benchmarks/dense_costs_host.json
    python tools/dense_costs.py scoring --work /tmp/coco_val_synth --out benchmarks/dense_costs_scoring.json
    python tools/dense_costs.py table benchmarks/dense_costs_model.json benchmarks/dense_costs_host.json \\
        benchmarks/dense_costs_scoring.json

``model``: per image, forward + backward FLOPs of the network (backbone, adapters, neck and head;
the loss and the label assignment are left out) at the recipe's input size, counted by
``torch.utils.flop_counter`` on the meta device; evaluation FLOPs per image (GFL at COCO's typical
640x480 image resized to 1067x800; UperNet's sliding windows, two per ADE20K image); the bytes
autograd saves for backward at the recipe's batch per GPU under bf16 autocast with CUDA's op lists
(a forward on fake CUDA tensors; attention as the memory-efficient SDPA kernel saves it); weights,
gradients and AdamW state (16 bytes per parameter).

``host``: for the COCO training set read from a (synthetic, full-scale) annotation file, the
resident memory one rank gains by building it and the private memory each DataLoader worker gains
over a full pass (its pages copied on write, measured from /proc/self/smaps_rollup after a full
garbage collection), in a fresh process per configuration (boxes only, and with masks).

``scoring``: pycocotools (loadRes, evaluate, accumulate, summarize) for 5,000 images with 100
detections each, boxes and masks, as rank 0 runs it after every evaluation.

``table``: the cost tables of DETECTION.md and SEGMENTATION.md from those JSON files, with the
projected hours on 8 H100s (989 TFLOP/s bf16 dense each) at ``--utilization`` of that peak.
Every part prints its table and writes JSON with the command and the machine.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

H100_BF16_DENSE = 989.4e12  # FLOP/s, H100 SXM, bf16 without sparsity
RECIPES = {  # the reference's schedules (DETECTION.md, SEGMENTATION.md)
    "gfl": {"train_images": 117_264 * 25, "evaluations": 25, "eval_images": 5000, "batch_per_gpu": 2,
            "input": 1024, "eval_input": (800, 1067), "classes": 80},
    "upernet": {"train_images": 160_000 * 16, "evaluations": 10, "eval_images": 2000, "batch_per_gpu": 2,
                "input": 512, "eval_windows": 2, "classes": 150},
}
BACKBONES = ("swin_tiny_256", "pvt_small_256")


def _meta() -> dict:
    import torch
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__}


def _write(out: str | None, obj: dict) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(obj, indent=1))


# ---- model ---------------------------------------------------------------------------------------

def _build(kind: str, backbone: str):
    from util.pretrained import build_backbone
    from detection.detector import build_detector
    from segmentation.heads import SegmentationModel
    if kind == "gfl":
        return build_detector("gfl", build_backbone(backbone, drop_path=0.0), RECIPES["gfl"]["classes"])
    return SegmentationModel(build_backbone(backbone, drop_path=0.0, img_size=RECIPES["upernet"]["input"]),
                             RECIPES["upernet"]["classes"])


def _network(kind: str, model, x):
    """The part the cost covers: GFL's backbone + neck + head outputs; UperNet's logits (decode and
    auxiliary heads, upsampled)."""
    import torch
    if kind == "gfl":
        cls, reg = model.head(list(model.neck(x).values()))
        return sum(c.float().sum() for c in cls) + sum(r.sum() for r in reg)
    feats = model.features(x)
    out = model.decode_head(feats).float().sum()
    if model.aux_head is not None:
        out = out + model.aux_head(feats[model.aux_index]).float().sum()
    return out + torch.zeros((), device=x.device)


def flops(kind: str, backbone: str, shape: tuple[int, int], train: bool) -> float:
    """FLOPs per image (fake CPU tensors: no memory, no arithmetic; fp32 graph): forward + backward
    when ``train``, else forward. Attention runs as SDPA's math path, whose matrix products the
    counter sees (it has no formula for the CPU's fused kernel and would count it as 0); the
    network's FLOPs, without a fused backward's recomputation. Counted on 2 images (BatchNorm in
    training refuses UperNet's 1x1 pooling of one image), halved."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with FakeTensorMode(), sdpa_kernel(SDPBackend.MATH):
        model = _build(kind, backbone).train(train)
        x = torch.empty(2, 3, *shape)
        with counter:
            out = _network(kind, model, x)
            if train:
                out.backward()
    return float(counter.get_total_flops()) / 2


class _EfficientAttention:
    """F.scaled_dot_product_attention as the memory-efficient CUDA kernel (what it saves for backward:
    q, k, v, the bias, the output and its log-sum-exp), for fake CUDA tensors, where SDPA would pick
    the materialising math path since no device can be asked."""

    def __enter__(self):
        import torch
        import torch.nn.functional as F
        self.orig = F.scaled_dot_product_attention

        def efficient(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
            bias = None
            if attn_mask is not None:
                bias = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p,
                                                                           is_causal, scale=scale)[0]
            return out.contiguous()  # the kernel's output is (B, L, H, D) in memory; callers may view it
        F.scaled_dot_product_attention = efficient
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F
        F.scaled_dot_product_attention = self.orig


def saved_bytes(kind: str, backbone: str, batch: int, size: int) -> tuple[int, int]:
    """(bytes autograd keeps for backward, parameter count) of one training forward at ``batch`` x
    ``size``^2 under CUDA bf16 autocast: fake CUDA tensors (no memory, no device), unique storages,
    parameters excluded."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    seen: dict[int, int] = {}
    with FakeTensorMode(), torch.device("cuda"):
        torch.manual_seed(0)
        model = _build(kind, backbone).train()
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        x = torch.empty(batch, 3, size, size)

        def pack(t):
            s = t.untyped_storage()
            if s._cdata not in params:
                seen[s._cdata] = s.nbytes()
            return t

        torch.set_autocast_dtype("cuda", torch.bfloat16)
        torch.set_autocast_enabled("cuda", True)  # (torch.autocast refuses without a device)
        try:
            with _EfficientAttention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                _network(kind, model, x)
        finally:
            torch.set_autocast_enabled("cuda", False)
        n_params = sum(p.numel() for p in model.parameters())
    return sum(seen.values()), n_params


def cmd_model(a) -> dict:
    rows = []
    for kind, r in RECIPES.items():
        for bb in BACKBONES:
            t = time.time()
            train = flops(kind, bb, (r["input"], r["input"]), True)
            ev = (flops(kind, bb, r["eval_input"], False) if kind == "gfl" else
                  r["eval_windows"] * flops(kind, bb, (r["input"], r["input"]), False))
            saved, n_params = saved_bytes(kind, bb, r["batch_per_gpu"], r["input"])
            rows.append({"recipe": kind, "backbone": bb, "params": n_params, "train_flops_per_image": train,
                         "eval_flops_per_image": ev, "saved_bytes_per_gpu": saved,
                         "batch_per_gpu": r["batch_per_gpu"], "input": r["input"],
                         "state_bytes_per_gpu": 16 * n_params, "seconds": time.time() - t})
            x = rows[-1]
            print(f"{kind:8s} {bb:14s} {n_params / 1e6:6.1f}M  train {train / 1e9:7.0f} GFLOPs/img  eval "
                  f"{ev / 1e9:6.0f} GFLOPs/img  saved {saved / 2**30:5.2f} GiB @ batch {x['batch_per_gpu']}  "
                  f"weights+grads+AdamW {16 * n_params / 2**30:4.2f} GiB", flush=True)
    return {**_meta(), "rows": rows}


# ---- host memory ---------------------------------------------------------------------------------

def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def _private_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(l.split()[1]) for l in f if l.startswith(("Private_Clean:", "Private_Dirty:")))


class _Probe:
    """Wraps a data set for a full pass: each item runs the whole pipeline and returns only
    (worker id, private kB or -1); the private memory is measured (after gc.collect()) at a worker's
    first item, every ``every`` items and at the first item of each batch among the last ``tail``
    indices (so every worker measures after its last batches)."""

    def __init__(self, ds, n: int, every: int, tail: int, batch: int) -> None:
        self.ds, self.n, self.every, self.tail, self.batch, self.calls = ds, n, every, tail, batch, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from torch.utils.data import get_worker_info
        first = self.calls == 0
        self.calls += 1
        measured = -1
        if first:
            gc.collect()
            measured = _private_kb()
        self.ds[(i, i)]
        if not first and (self.calls % self.every == 0 or (i >= self.n - self.tail and i % self.batch == 0)):
            gc.collect()
            measured = _private_kb()
        info = get_worker_info()
        return (info.id if info else 0, measured)


def host_child(a) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from detection.coco import CocoDetection
    torch.set_num_threads(1)
    gc.collect()
    rss0, peak0 = _rss_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    ds = CocoDetection(a.coco, "train", train=True, input_size=64, with_masks=a.masks)
    build_s = time.time() - t
    gc.collect()
    rss1, peak1 = _rss_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the reading process, if any
    out = {"masks": a.masks, "images": len(ds), "build_seconds": build_s, "rank_rss_growth_mb": (rss1 - rss0) / 1024,
           "rank_rss_mb": rss1 / 1024, "rank_peak_growth_mb": (max(peak1, child_peak) - rss0) / 1024,
           "array_mb": getattr(getattr(ds, "annotations", None), "nbytes", 0) / 2**20}
    if a.workers:
        n = len(ds) if a.limit is None else min(a.limit, len(ds))
        probe = _Probe(ds, n, every=10_000, tail=2 * a.workers * 64, batch=64)
        seen: dict[int, list[int]] = {}
        t = time.time()
        for batch in DataLoader(probe, batch_size=64, num_workers=a.workers, collate_fn=lambda b: b):
            for wid, kb in batch:
                if kb >= 0:
                    seen.setdefault(wid, []).append(kb)
        out.update(pass_items=n, pass_seconds=time.time() - t, workers={
            str(w): {"start_private_mb": v[0] / 1024, "end_private_mb": v[-1] / 1024, "growth_mb": (v[-1] - v[0]) / 1024}
            for w, v in sorted(seen.items())})
    return out


def cmd_host(a) -> dict:
    rows = []
    for masks in (False, True):
        cmd = [sys.executable, __file__, "_host_child", "--coco", a.coco, "--workers", str(a.workers)]
        cmd += ["--masks"] if masks else []
        cmd += ["--limit", str(a.limit)] if a.limit else []
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            sys.exit(res.stderr[-3000:])
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(r)
        worst = max((w["growth_mb"] for w in r.get("workers", {}).values()), default=float("nan"))
        print(f"masks {str(masks):5s}: {r['images']} images; rank +{r['rank_rss_growth_mb']:.0f} MB resident "
              f"(arrays {r['array_mb']:.0f} MB, transient peak while reading +{r['rank_peak_growth_mb']:.0f} MB, "
              f"{r['build_seconds']:.0f} s); worker private growth over {r.get('pass_items', 0)} items: "
              f"max {worst:.0f} MB", flush=True)
    return {**_meta(), "annotation_file": str(Path(a.coco) / "annotations" / "instances_train2017.json"),
            "rows": rows}


# ---- pycocotools -------------------------------------------------------------------------------

def cmd_scoring(a) -> dict:
    import numpy as np
    from pycocotools import mask as mask_utils

    from detection.coco import coco_evaluate, load_coco
    from tools.make_tiny_coco import write_synthetic_coco
    work = Path(a.work)
    ann = work / "annotations" / "instances_val2017.json"
    if not ann.is_file():  # COCO val2017's scale: 5,000 images of 640 x 480, 36,781 instances
        write_synthetic_coco(work, "val", a.images, a.instances, size=(640, 480), vertices=(10, 50),
                             link_images=False)
    t = time.time()
    gt = load_coco(ann)
    load_s = time.time() - t
    rng = np.random.default_rng(0)
    cats = sorted(gt.getCatIds())
    results = []
    for img_id in gt.getImgIds():
        gts = gt.imgToAnns.get(img_id, [])
        for k in range(a.dets):
            if k < len(gts) * 3:  # jittered copies of the ground truth, then random boxes
                g = gts[k % len(gts)]
                x, y, w, h = (v + rng.normal(0, 4) for v in g["bbox"])
                cat = g["category_id"]
            else:
                x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 380), rng.uniform(8, 140), rng.uniform(8, 100)
                cat = int(rng.choice(cats))
            box = [float(max(x, 0)), float(max(y, 0)), float(max(w, 1)), float(max(h, 1))]
            rle = mask_utils.frPyObjects(np.asarray([box], np.float64), 480, 640)[0]
            results.append({"image_id": img_id, "category_id": int(cat), "bbox": box, "score": float(rng.random()),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    out = {**_meta(), "images": len(gt.getImgIds()), "instances": len(gt.anns), "detections": len(results),
           "load_seconds": load_s}
    for iou_type in ("bbox", "segm"):
        t = time.time()
        coco_evaluate(gt, results, [iou_type])
        out[f"{iou_type}_seconds"] = time.time() - t
        print(f"pycocotools {iou_type}: {out[f'{iou_type}_seconds']:.0f} s for {out['images']} images, "
              f"{len(results)} detections (ground truth loaded in {load_s:.1f} s)", flush=True)
    return out


# ---- the table -----------------------------------------------------------------------------------

def cmd_table(a) -> dict:
    parts = [json.loads(Path(p).read_text()) for p in a.inputs]
    model = next(p for p in parts if p.get("rows") and "train_flops_per_image" in p["rows"][0])
    host = next((p for p in parts if p.get("rows") and "rank_rss_growth_mb" in p["rows"][0]), None)
    scoring = next((p for p in parts if "bbox_seconds" in p), None)
    u = a.utilization
    rows = []
    for r in model["rows"]:
        rec = RECIPES[r["recipe"]]
        train = r["train_flops_per_image"] * rec["train_images"]
        ev = r["eval_flops_per_image"] * rec["eval_images"] * rec["evaluations"]
        gpu_h = (train + ev) / (a.gpus * H100_BF16_DENSE * u) / 3600
        score_h = (scoring["bbox_seconds"] * rec["evaluations"] / 3600) if scoring and r["recipe"] == "gfl" else 0.0
        rows.append({**r, "train_flops_total": train, "eval_flops_total": ev, "gpu_hours": gpu_h,
                     "scoring_hours": score_h, "hours": gpu_h + score_h, "utilization": u, "gpus": a.gpus})
        print(f"| {r['recipe']} {r['backbone']} | {r['train_flops_per_image'] / 1e9:.0f} | "
              f"{r['eval_flops_per_image'] / 1e9:.0f} | {r['saved_bytes_per_gpu'] / 2**30:.2f} | "
              f"{r['state_bytes_per_gpu'] / 2**30:.2f} | {gpu_h:.1f} + {score_h:.1f} = {gpu_h + score_h:.1f} |")
    if host:
        for h in host["rows"]:
            worst = max((w["growth_mb"] for w in h.get("workers", {}).values()), default=float("nan"))
            print(f"host, masks {h['masks']}: rank +{h['rank_rss_growth_mb']:.0f} MB, worker +{worst:.0f} MB")
    if scoring:
        print(f"pycocotools, {scoring['images']} images: bbox {scoring['bbox_seconds']:.0f} s, "
              f"segm {scoring['segm_seconds']:.0f} s")
    return {**_meta(), "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    m = sub.add_parser("model")
    m.add_argument("--out")
    h = sub.add_parser("host")
    h.add_argument("--coco", required=True, help="a COCO-layout folder (tools/make_tiny_coco.py --synthetic)")
    h.add_argument("--workers", type=int, default=2)
    h.add_argument("--limit", type=int, default=None, help="items of the pass (default: all)")
    h.add_argument("--out")
    c = sub.add_parser("_host_child")
    c.add_argument("--coco", required=True)
    c.add_argument("--masks", action="store_true")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--limit", type=int, default=None)
    s = sub.add_parser("scoring")
    s.add_argument("--work", required=True, help="folder for the synthetic val2017 annotation file")
    s.add_argument("--images", type=int, default=5000)
    s.add_argument("--instances", type=int, default=36_781)
    s.add_argument("--dets", type=int, default=100)
    s.add_argument("--out")
    t = sub.add_parser("table")
    t.add_argument("inputs", nargs="+")
    t.add_argument("--utilization", type=float, default=0.25, help="fraction of the bf16 dense peak reached")
    t.add_argument("--gpus", type=int, default=8)
    t.add_argument("--out")
    a = p.parse_args()
    if a.part == "_host_child":
        print(json.dumps(host_child(a)))
        return 0
    out = {"model": cmd_model, "host": cmd_host, "scoring": cmd_scoring, "table": cmd_table}[a.part](a)
    _write(a.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
