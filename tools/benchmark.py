"""Benchmark pretraining models against each other: step time, images/s, memory, FLOPs.

    python tools/benchmark.py --models mae_swin_tiny_256 simmim_swin_tiny_256 --batch_size 64 --amp bf16

Everything runs in one process on synthetic images. Each model gets AdamW
(betas 0.9, 0.95), ``--warmup`` untimed steps, then ``--steps`` timed full training
steps (forward, backward, optimizer step). The models take turns step by step
(A, B, A, B, ...), so slow drift of the machine (clocks, heat, neighbours) hits
every model alike; the reported time is the median step.

Masks follow each model's recipe, read from its contract (models.contract): uniform
sampling when ``mask_kind == 'uniform'`` (or with ``--mask_regular`` for models that
accept any mask), else random masks at ``default_mask_ratio``. Models fed uniform masks
that take a secondary mask get ``--vis_mask_ratio`` (0.25, as the UM-MAE recipes);
``--norm_pix_loss recipe`` turns norm-pix targets on for every model whose recipe is not
``raw_pixel_recipe`` (the SimMIM baselines, which the reference trained on raw pixels).

Memory:
  * GPU: the peak allocated during a step, as if the model were alone on the
    device: ``max_memory_allocated`` (reset before the step) minus what was
    allocated before it, plus the model's resident bytes (parameters, buffers,
    optimizer state and its input batch).
  * CPU: the bytes of the tensors autograd saves for backward in one forward
    (unique storages, parameters and buffers excluded), via
    ``torch.autograd.graph.saved_tensors_hooks``. It is reported on GPU too.

Memory on a GPU is also reported as the peak *reserved* by the caching allocator (what runs
out first): after the timed steps, one more step per model on an emptied cache, the growth of
``max_memory_reserved`` plus the model's resident bytes.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward,
with attention on SDPA's math backend so that its matmuls are counted on every
device, at a batch of ``FLOP_BATCH`` samples (the first ones of the batch) and
scaled to the batch: the count is linear in the batch, and the math backend's
materialised attention at a batch of 128 would cost seconds and gigabytes.
A model whose sample carries several images (``images_per_sample``,
e.g. MixMAE) is reported per image. Ratios are baseline / row, per image: above
1 means the row is faster / smaller / cheaper than the baseline.

Numerics as in the programs (``util.run.gpu_numerics``): on a GPU fp32 matmuls
and convolutions run in TF32.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models
from models.masking import random_mask, secondary_mask, uniform_mask
from util.cpu_perf import (add_cpu_tuning_args, onednn_linear_available, resolve_cpu_matmul, retain_freed_memory,
                           setup_cpu_training)
from util.loop import autocast, make_scaler
from util.run import gpu_numerics
from util.run_record import cpu_name, write_report

MIB = 2 ** 20
FLOP_BATCH = 2  # samples the FLOPs are counted on (then scaled to the batch)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Benchmark pretraining models (one process, interleaved steps)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="pretraining model names")
    p.add_argument("--batch_size", type=int, default=64, help="samples per step (per model)")
    p.add_argument("--input_size", type=int, default=None, help="image size (default: each model's native size)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast precision")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    p.add_argument("--baseline", default=None,
                   help="model the ratios compare to (default: the first SimMIM model in --models, if any)")
    p.add_argument("--vis_mask_ratio", type=float, default=0.25,
                   help="secondary masking ratio for models fed uniform masks (UM-MAE recipe: 0.25)")
    p.add_argument("--norm_pix_loss", default="recipe", choices=["recipe", "on", "off"],
                   help="norm-pix targets: 'recipe' = on for all but the SimMIM baselines")
    p.add_argument("--mask_regular", action="store_true",
                   help="uniform masks also for models that accept any mask (UM-MAE ViT)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (does not affect speed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images, masks and weights")
    p.add_argument("--compile", action="store_true", help="time torch.compile'd models (FLOPs/memory: eager)")
    add_cpu_tuning_args(p)  # --cpu_tuning / --cpu_matmul, as in main_pretrain.py (off unless asked)
    p.add_argument("--cpu_malloc", default=None, choices=["retain", "system"],
                   help="CPU: keep freed memory in the process or glibc's defaults (default: retain with "
                        "--cpu_tuning, else system)")
    p.add_argument("--json", default=None, help="write the results here")
    return p


# ---------------------------------------------------------------- measurements


def _onednn_linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """util.cpu_perf's oneDNN GEMM: x (..., K) @ w (N, K)^T."""
    return 2 * math.prod(x_shape) * w_shape[0]


def count_flops(model: nn.Module, imgs: Tensor, mask: Tensor, sm: Optional[Tensor], amp: str,
                device: torch.device) -> int:
    """FLOPs of one forward + backward (matmuls and convolutions, attention included)."""
    onednn = {torch.ops.mkldnn._linear_pointwise: _onednn_linear_flops} if onednn_linear_available() else {}
    counter = FlopCounterMode(display=False, custom_mapping=onednn)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        with autocast(amp, device):
            loss = _forward(model, imgs, mask, sm)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def saved_activation_bytes(model: nn.Module, imgs: Tensor, mask: Tensor, sm: Optional[Tensor], amp: str,
                           device: torch.device) -> int:
    """Bytes autograd keeps for backward after one forward: unique storages, parameters/buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
            return t
        ptr = s.data_ptr()
        if ptr and ptr not in own:
            storages[ptr] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(amp, device):
            loss = _forward(model, imgs, mask, sm)
    del loss  # frees the graph without a backward
    return sum(storages.values())


def _forward(model, imgs: Tensor, mask: Tensor, sm: Optional[Tensor]) -> Tensor:
    out = model(imgs, mask, sm) if sm is not None else model(imgs, mask)
    return out[0]


def _tensor_bytes(obj) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- one model under test


@dataclass
class Entry:
    name: str
    model: nn.Module
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    imgs: Tensor
    uniform: bool
    mask_ratio: float
    vis_mask_ratio: float
    norm_pix_loss: bool
    generator: torch.Generator
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    raw_peaks: list[int] = field(default_factory=list)
    reserved_peak: Optional[int] = None
    last_loss: Optional[Tensor] = None

    @property
    def images_per_sample(self) -> int:
        return self.model.contract.images_per_sample

    def draw(self) -> tuple[Tensor, Optional[Tensor]]:
        n, t = self.imgs.shape[0], self.model.token_size
        dev = self.imgs.device
        if self.uniform:
            mask = uniform_mask(n, t, generator=self.generator, device=dev)
        else:
            mask = random_mask(n, t * t, self.mask_ratio, generator=self.generator, device=dev)
        sm = secondary_mask(mask, self.vis_mask_ratio, generator=self.generator) if self.vis_mask_ratio > 0 else None
        return mask, sm

    def step(self, amp: str, device: torch.device, mask: Tensor, sm: Optional[Tensor]) -> None:
        with autocast(amp, device):
            loss = _forward(self.runner, self.imgs, mask, sm)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        # gradients are freed within the step, so between steps only resident_bytes() stay allocated
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()

    def resident_bytes(self) -> int:
        """Parameters, buffers, optimizer state and the input batch: what stays allocated between steps."""
        return (_tensor_bytes(list(self.model.parameters())) + _tensor_bytes(list(self.model.buffers()))
                + _tensor_bytes(list(self.optimizer.state.values())) + _tensor_bytes(self.imgs))


def build_entry(name: str, args, device: torch.device) -> Entry:
    base = {} if args.input_size is None else {"img_size": args.input_size}
    probe = models.describe(name, **base)
    uniform = probe.mask_kind == "uniform" or (args.mask_regular and probe.mask_kind == "any")
    kwargs = dict(base)
    vmr = args.vis_mask_ratio if uniform and probe.secondary_mask else 0.0
    if vmr > 0:
        kwargs["vis_mask_ratio"] = vmr
    norm_pix = args.norm_pix_loss == "on" or (args.norm_pix_loss == "recipe" and not probe.raw_pixel_recipe)
    kwargs["norm_pix_loss"] = norm_pix
    model = models.create_model(name, **kwargs).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # the same optimizer as main_pretrain.py (fused AdamW on CPU and CUDA)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=device.type in ("cpu", "cuda") or None)
    size = probe.input_size
    gen = torch.Generator(device=device).manual_seed(args.seed)
    imgs = torch.randn(args.batch_size, 3, size, size, generator=gen, device=device)
    ratio = probe.default_mask_ratio
    setup_cpu_training(model, device, args.cpu_matmul, compiled=args.compile, malloc=False)
    runner = torch.compile(model) if args.compile else model
    return Entry(name, model, runner, optimizer, make_scaler(args.amp, device), imgs, uniform, ratio, vmr,
                 norm_pix, gen)


# ---------------------------------------------------------------- the benchmark


def hardware(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device)}
    info["cpu"] = cpu_name()
    info["logical_cpus"] = os.cpu_count()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run(args, argv: list[str]) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu_numerics(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_malloc = "n/a"
    if device.type == "cpu":
        cpu_malloc = "retain" if args.cpu_malloc == "retain" and retain_freed_memory() else "system"
    cpu_matmul = "n/a"
    if device.type == "cpu":
        cpu_matmul = "onednn" if args.cpu_matmul == "onednn" and onednn_linear_available() and not args.compile \
            else "aten"
    torch.manual_seed(args.seed)
    entries = [build_entry(name, args, device) for name in args.models]
    on_gpu = device.type == "cuda"

    static = {}
    for e in entries:
        mask, sm = e.draw()
        k = min(FLOP_BATCH, args.batch_size)
        flops = count_flops(e.model, e.imgs[:k], mask[:k], None if sm is None else sm[:k], args.amp, device)
        flops = flops * args.batch_size // k
        saved = saved_activation_bytes(e.model, e.imgs, mask, sm, args.amp, device)
        static[e.name] = (flops, saved)

    for _ in range(args.warmup):
        for e in entries:
            e.step(args.amp, device, *e.draw())
    for _ in range(args.steps):
        for e in entries:  # interleaved: one step of each model in turn
            mask, sm = e.draw()
            _sync(device)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            e.step(args.amp, device, mask, sm)
            _sync(device)
            e.times.append(time.perf_counter() - t0)
            if on_gpu:
                e.raw_peaks.append(torch.cuda.max_memory_allocated(device))
                e.peaks.append(e.raw_peaks[-1] - before)
    if on_gpu:  # reserved memory, model by model on an emptied cache (untimed: freeing the cache costs time)
        for e in entries:
            mask, sm = e.draw()
            _sync(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_reserved(device)
            e.step(args.amp, device, mask, sm)
            _sync(device)
            e.reserved_peak = torch.cuda.max_memory_reserved(device) - before + e.resident_bytes()

    rows = []
    for e in entries:
        loss = float(e.last_loss) if e.last_loss is not None else float("nan")
        images = args.batch_size * e.images_per_sample
        median = statistics.median(e.times) if e.times else float("nan")
        flops, saved = static[e.name]
        peak = max(e.peaks) + e.resident_bytes() if e.peaks else None
        memory = peak if on_gpu else saved
        rows.append({
            "model": e.name,
            "input_size": int(e.imgs.shape[-1]),
            "batch_size": args.batch_size,
            "images_per_sample": e.images_per_sample,
            "images_per_step": images,
            "mask": "uniform" if e.uniform else f"random {e.mask_ratio:g}",
            "vis_mask_ratio": e.vis_mask_ratio,
            "norm_pix_loss": e.norm_pix_loss,
            "params": sum(p.numel() for p in e.model.parameters()),
            "trainable_params": sum(p.numel() for p in e.model.parameters() if p.requires_grad),
            "median_step_s": median,
            "step_times_s": e.times,
            "images_per_s": images / median if e.times else float("nan"),
            "flops_per_step": flops,
            "flops_per_image": flops / images,
            "saved_tensor_bytes": saved,
            "saved_tensor_bytes_per_image": saved / images,
            "peak_mem_bytes": peak,
            "gpu_max_allocated_bytes": max(e.raw_peaks) if e.raw_peaks else None,  # all models' tensors included
            # what the caching allocator reserves for one step as if the model were alone: the growth of
            # reserved memory over a step started on an emptied cache, plus the resident bytes
            "peak_reserved_bytes": e.reserved_peak,
            "memory_bytes": memory,
            "memory_bytes_per_image": memory / images,
            "final_loss": loss if math.isfinite(loss) else None,
        })

    baseline = args.baseline or next((n for n in args.models if models.describe(n).family == "simmim"), None)
    base = next((r for r in rows if r["model"] == baseline), None)
    for r in rows:
        if base is None:
            r["ratios"] = None
            continue
        r["ratios"] = {
            "time": _ratio(base["median_step_s"] / base["images_per_step"], r["median_step_s"] / r["images_per_step"]),
            "memory": _ratio(base["memory_bytes_per_image"], r["memory_bytes_per_image"]),
            "flops": _ratio(base["flops_per_image"], r["flops_per_image"]),
        }
        if on_gpu:
            r["ratios"]["reserved"] = _ratio(base["peak_reserved_bytes"] / base["images_per_step"],
                                             r["peak_reserved_bytes"] / r["images_per_step"])
    return {
        "hardware": hardware(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(shlex.quote(a) for a in argv),
        "device": str(device),
        "amp": args.amp,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": bool(args.compile),
        "cpu_tuning": bool(args.cpu_tuning),
        "cpu_matmul": cpu_matmul,
        "cpu_malloc": cpu_malloc,
        "interleaved": True,
        "memory_metric": ("gpu_peak_allocated: peak allocated during a step + resident parameters, optimizer "
                          "state and batch" if on_gpu else
                          "saved_tensors: bytes of the tensors saved for backward in one forward "
                          "(unique storages, parameters excluded)"),
        "flops_metric": f"FlopCounterMode, forward + backward, SDPA on the math backend, counted at batch "
                        f"{min(FLOP_BATCH, args.batch_size)} and scaled to the batch",
        "tf32": bool(on_gpu and torch.backends.cuda.matmul.allow_tf32),
        "ratio_definition": "baseline / row, per image (above 1: the row is faster / smaller / cheaper)",
        "baseline": base["model"] if base is not None else None,
        "results": rows,
    }


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b and b == b and a == a else None


def markdown_table(report: dict) -> str:
    mem_name = "peak mem" if report["memory_metric"].startswith("gpu") else "saved for bwd"
    on_gpu = report["memory_metric"].startswith("gpu")
    head = ["model", "input", "batch", "step (ms)", "img/s", "GFLOPs/img", f"{mem_name} (MiB)"]
    head += ["reserved (MiB)"] if on_gpu else []
    if report["baseline"]:
        head += [f"time x (vs {report['baseline']})", "memory x", "FLOPs x"] + (["reserved x"] if on_gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [r["model"], str(r["input_size"]), f"{r['batch_size']}x{r['images_per_sample']}"
                 if r["images_per_sample"] != 1 else str(r["batch_size"]),
                 f"{1e3 * r['median_step_s']:.1f}", f"{r['images_per_s']:.1f}", f"{r['flops_per_image'] / 1e9:.2f}",
                 f"{r['memory_bytes'] / MIB:.1f}"]
        cells += [f"{r['peak_reserved_bytes'] / MIB:.1f}"] if on_gpu else []
        if report["baseline"]:
            cells += [f"{v:.2f}" if v is not None else "-" for v in r["ratios"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    hw = report["hardware"]
    where = hw.get("gpu") or f"{hw.get('cpu')} ({report['threads']} threads)"
    lines.append("")
    cpu = (f"; CPU settings: {report['cpu_matmul']} linear layers, {report['cpu_malloc']} malloc"
           if report["device"].startswith("cpu") else "")
    lines.append(f"{where}; torch {report['torch']}; amp {report['amp']}{cpu}; median of {report['steps']} interleaved "
                 f"steps after {report['warmup']} warm-up; memory = {report['memory_metric']}; "
                 f"ratios = {report['ratio_definition']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    resolve_cpu_matmul(args)
    if args.cpu_malloc is None:
        args.cpu_malloc = "retain" if args.cpu_tuning else "system"
    known = models.list_models(task="pretrain")
    for name in args.models:
        if name not in known:
            parser.error(f"unknown model {name!r}; valid pretraining models: {', '.join(known)}")
    if args.baseline is not None and args.baseline not in args.models:
        parser.error(f"--baseline {args.baseline!r} is not in --models")
    if len(set(args.models)) != len(args.models):
        parser.error("--models lists a model twice")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch_size and --steps must be >= 1, --warmup >= 0")
    device = str(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not device.startswith(("cuda", "cpu")):
        parser.error(f"--device {device!r}: valid choices are cuda, cuda:N, cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device} but no CUDA device is available; valid here: cpu")
    if args.amp == "fp16" and not device.startswith("cuda"):
        parser.error("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or none")
    for name in args.models:
        note = models.describe(name).compile_note if args.compile else ""
        if note:
            parser.error(f"--compile does not suit {name}: it {note}")
    if args.compile and args.warmup < 1:
        print("warning: --compile with --warmup 0: the timed steps include compilation", file=sys.stderr)
    report = run(args, ["python", "tools/benchmark.py"] + argv)
    return write_report(report, markdown_table(report), args.json)


if __name__ == "__main__":
    main()
