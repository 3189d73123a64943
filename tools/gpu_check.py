"""One-shot check of the framework on one CUDA GPU: versions, correctness, then speed.

    bash scripts/gpu_check.sh                  # on the GPU machine (at most 7 minutes)
    bash scripts/gpu_check.sh --dry-run        # anywhere: the parts that need no CUDA, and the plan

It prints the versions first, one line per part as it finishes, then a table, and writes
``gpu_check.json`` (and the benchmark's own JSON files) into ``--out``. Parts, in order:

  versions         torch / torchvision (and the CUDA each was built for), timm, cuDNN, NCCL, the GPU
  cpu_vs_gpu       UM-MAE / SimMIM Swin-T and PVT-S, one step on the same weights and CPU-drawn masks:
                   float64 loss and gradient norm within 1e-10, fp32 (TF32 off) within 1e-4, bf16
                   loss within 2e-2 and gradient cosine >= 0.99, each against the CPU in float64
  attention        each recipe model's step with SDPA's math kernel excluded (a model that needs it
                   fails), and the kernel SDPA picks for every call
  sdpa_agreement   cuDNN and memory-efficient attention against fp32 math at the window shapes
                   (outputs, q/k/v and mask gradients; NaNs), a row of very negative logits included
  bias_precision   Swin-T stage-1 position-MLP gradient error under bf16, against the qkv weights'
  decode_race      GPU decoding of 64 JPEGs while ~100 ms of kernels and reductions of freed tensors
                   are queued, 50 times: torchvision on the training stream (the hazard) and
                   util.decode (side stream): corrupted reductions counted
  decode_awkward   GPU vs CPU decoding of baseline, 4:4:4, progressive, greyscale, CMYK, EXIF,
                   8x8 and truncated JPEGs
  ddp_nccl         a one-process NCCL group built by util.distributed as torchrun would, DDP as the
                   programs wrap it, two accumulated steps of the training loop; the stop agreement
                   under CUDA's sync debug mode (no host-device synchronisation)
  speed            tools/benchmark.py, UM-MAE vs SimMIM, Swin-T and PVT-S, batch 128, bf16
  loader           main_pretrain.py on generated JPEG shards, --decode fast vs --decode gpu: images/s
                   with data loading, and the share of time waiting for data
  torchrun         torchrun --nproc_per_node=1 main_pretrain.py: bf16, --exit_after_epoch, then an
                   fp16 resume of the GPU-written checkpoint (when time remains)

A part whose time would not fit the budget (``--budget``, 400 s) is skipped and says so.
The code stays importable on torch 2.11 / torchvision 0.26 (the lent GPU machine's own Python).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

# module names of the wheels carried for a machine without a registry (scripts/gpu_check.sh fills .whl/)
WHEEL_MODULES = {"simplejpeg": "simplejpeg", "submitit": "submitit", "pycocotools": "pycocotools",
                 "webdataset": "webdataset", "braceexpand": "braceexpand", "cloudpickle": "cloudpickle",
                 "pyyaml": "yaml"}


def use_carried_wheels(folder: Path) -> list[str]:
    """Unpack each wheel in ``folder`` whose module is not importable into ``folder/site`` (a wheel is a
    zip archive laid out as site-packages), and put that folder on sys.path and PYTHONPATH for this
    process and the programs it starts. Returns the unpacked wheels' names."""
    import importlib.util
    site = folder / "site"
    unpacked = []
    for whl in sorted(folder.glob("*.whl")):
        dist = whl.name.split("-")[0].lower().replace("_", "-")
        module = WHEEL_MODULES.get(dist, dist.replace("-", "_"))
        if importlib.util.find_spec(module) is not None and not (site / module).exists():
            continue
        site.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        unpacked.append(whl.name)
    if site.is_dir():
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return unpacked


sys.path.insert(0, str(ROOT))
_CARRIED = use_carried_wheels(ROOT / ".whl") if __name__ == "__main__" else []

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

MIB = 2 ** 20
SWIN_T, PVT_S = ("mae_swin_tiny_256", "simmim_swin_tiny_256"), ("mae_pvt_small_256", "simmim_pvt_small_256")
PICO_PAIRS = ("mae_swin_pico_128", "simmim_swin_pico_128", "mae_pvt_pico_128", "simmim_pvt_pico_128")
RECIPE_MODELS = {  # name -> batch of the attention part
    "mae_swin_tiny_256": 8, "simmim_swin_tiny_256": 8, "mae_pvt_small_256": 8, "simmim_pvt_small_256": 8,
    "mae_hiera_tiny_224": 8, "mixmim_base": 8, "greenmim_swin_tiny_patch4_dec512b1": 8}


# ---------------------------------------------------------------- helpers


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _model_kwargs(name: str) -> dict:
    """The recipe's model options: UM-MAE secondary masking 0.25 and norm-pix; SimMIM raw pixels."""
    import models
    probe = models.describe(name)
    kw = {"norm_pix_loss": not probe.raw_pixel_recipe}
    if probe.mask_kind == "uniform" and probe.secondary_mask:
        kw["vis_mask_ratio"] = 0.25
    return kw


def _cpu_masks(model, batch: int, seed: int):
    """Masks drawn on the CPU from a CPU generator (the device's generator would draw others)."""
    from models.masking import random_mask, secondary_mask, uniform_mask
    c = model.contract
    gen = torch.Generator().manual_seed(seed)
    if c.mask_kind == "uniform":
        mask = uniform_mask(batch, c.token_size, generator=gen)
    else:
        mask = random_mask(batch, c.token_size ** 2, c.default_mask_ratio, generator=gen)
    sm = secondary_mask(mask, c.vis_mask_ratio, generator=gen) if c.vis_mask_ratio > 0 else None
    return mask, sm


def _step(model, imgs, mask, sm, amp_dtype: Optional[torch.dtype]):
    dev = imgs.device
    ctx = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else torch.autocast(dev.type, enabled=False)
    with ctx:
        out = model(imgs, mask, sm) if sm is not None else model(imgs, mask)
    out[0].backward()
    return out[0]


def _loss_and_grad(model, imgs, mask, sm, device, dtype, amp_dtype=None) -> tuple[float, torch.Tensor]:
    m = copy.deepcopy(model).to(device=device, dtype=dtype).train()
    loss = _step(m, imgs.to(device, dtype), mask.to(device), None if sm is None else sm.to(device), amp_dtype)
    grad = torch.cat([p.grad.detach().double().flatten().cpu() for p in m.parameters() if p.grad is not None])
    return float(loss), grad


class tf32_off:
    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def photo_jpeg(w: int, h: int, seed: int, mode: str = "RGB", **save) -> bytes:
    """A smooth random scene with sensor-like noise, as a JPEG (ImageNet-like content and size)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((9, 12, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.clip(np.asarray(base, dtype=np.float32) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).convert(mode).save(b, "JPEG", **{"quality": 90, **save})
    return b.getvalue()


def awkward_jpegs() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated
    good = photo_jpeg(500, 375, 1)
    return {"baseline 4:2:0": good, "4:4:4": photo_jpeg(500, 375, 2, subsampling=0),
            "progressive": photo_jpeg(500, 375, 3, progressive=True), "greyscale": photo_jpeg(375, 500, 4, "L"),
            "CMYK": photo_jpeg(400, 300, 5, "CMYK"), "EXIF-rotated": photo_jpeg(500, 375, 6, exif=exif.tobytes()),
            "8x8": photo_jpeg(8, 8, 7), "truncated": good[: len(good) // 2]}


def _planned(datas: list[bytes], size: int, names: Optional[list[str]] = None):
    from util.datasets import seeded_apply
    from util.decode import Encoded, PlanTransform
    plan = PlanTransform(size)
    return [seeded_apply(plan, Encoded(d, (names or [f"img{i}.jpg" for i in range(len(datas))])[i]), i)
            for i, d in enumerate(datas)]


# ---------------------------------------------------------------- parts


def part_versions(ctx) -> dict:
    import timm
    import torchvision
    tv_cuda = getattr(torchvision.version, "cuda", None)   # e.g. 13020 for CUDA 13.2
    if isinstance(tv_cuda, int):
        tv_cuda = f"{tv_cuda // 1000}.{tv_cuda % 1000 // 10}"
    v = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "torchvision": torchvision.__version__, "torchvision_cuda": tv_cuda,
         "timm": timm.__version__, "numpy": np.__version__, "cuda_available": torch.cuda.is_available(),
         "carried_wheels": _CARRIED, "gcc": shutil.which("gcc")}
    import importlib.util
    v["optional_modules"] = {m: importlib.util.find_spec(m) is not None
                             for m in ("simplejpeg", "submitit", "pycocotools", "webdataset", "braceexpand",
                                       "tensorboard")}
    if torch.cuda.is_available():
        v.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                 gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1),
                 cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(),
                 sdp_enabled={k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                              for k in ("flash", "mem_efficient", "math", "cudnn")
                              if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")})
        try:
            v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001 (a build without NCCL)
            v["nccl"] = f"unavailable: {e}"
        smi = shutil.which("nvidia-smi")
        if smi:
            r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            v["nvidia_smi"] = r.stdout.strip()
    ctx.versions = v
    return {"status": "passed", "summary": f"torch {v['torch']} (CUDA {v['torch_cuda']}), torchvision "
                                           f"{v['torchvision']} (CUDA {v['torchvision_cuda']}), timm {v['timm']}",
            "details": v}


def part_cpu_vs_gpu(ctx) -> dict:
    """Same weights, CPU-drawn masks: CPU float64 is the reference for every device / precision."""
    import models
    names = SWIN_T + PVT_S if not ctx.dry_run else PICO_PAIRS
    batch = 4 if not ctx.dry_run else 2
    rows, ok = [], True
    for name in names:
        torch.manual_seed(0)
        model = models.create_model(name, **_model_kwargs(name)).train()
        c = model.contract
        imgs = torch.randn(batch, 3, c.input_size, c.input_size, generator=torch.Generator().manual_seed(1))
        mask, sm = _cpu_masks(model, batch, 2)
        ref_loss, ref_grad = _loss_and_grad(model, imgs, mask, sm, torch.device("cpu"), torch.float64)
        dev = ctx.device
        l64, g64 = _loss_and_grad(model, imgs, mask, sm, dev, torch.float64)
        with tf32_off():
            l32, g32 = _loss_and_grad(model, imgs, mask, sm, dev, torch.float32)
        lbf, gbf = _loss_and_grad(model, imgs, mask, sm, dev, torch.float32, torch.bfloat16)
        gn = float(ref_grad.norm())
        r = {"model": name, "loss_cpu64": ref_loss, "loss_dev64": l64, "loss_dev32": l32, "loss_devbf16": lbf,
             "fp64_loss": _rel(l64, ref_loss), "fp64_gradnorm": _rel(float(g64.norm()), gn),
             "fp32_loss": _rel(l32, ref_loss), "fp32_gradnorm": _rel(float(g32.norm()), gn),
             "fp32_grad_vector": float((g32 - ref_grad).norm() / gn),
             "bf16_loss": _rel(lbf, ref_loss), "bf16_grad_cosine": float(F.cosine_similarity(gbf, ref_grad, dim=0)),
             "finite": all(map(np.isfinite, (l64, l32, lbf))) and bool(torch.isfinite(gbf).all())}
        r["ok"] = (r["fp64_loss"] <= 1e-10 and r["fp64_gradnorm"] <= 1e-10 and r["fp32_loss"] <= 1e-4
                   and r["fp32_gradnorm"] <= 1e-4 and r["bf16_loss"] <= 2e-2 and r["bf16_grad_cosine"] >= 0.99
                   and r["finite"])
        ok &= r["ok"]
        rows.append(r)
        ctx.say(f"  {name:24s} fp64 {r['fp64_loss']:.1e}/{r['fp64_gradnorm']:.1e}  fp32 {r['fp32_loss']:.1e}/"
                f"{r['fp32_gradnorm']:.1e}  bf16 loss {r['bf16_loss']:.1e} cos {r['bf16_grad_cosine']:.5f}"
                f"  {'ok' if r['ok'] else 'FAIL'}")
    worst = max(rows, key=lambda r: r["bf16_loss"])
    return {"status": "passed" if ok else "failed", "rows": rows,
            "summary": f"{sum(r['ok'] for r in rows)}/{len(rows)} models within the bounds; worst bf16 loss "
                       f"{worst['bf16_loss']:.1e} ({worst['model']})"}


def _sdpa_spy(calls: list):
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        choice = None
        try:  # the kernel SDPA picks for these inputs (private, so guarded)
            from torch.nn.attention import SDPBackend
            choice = SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal)).name
        except Exception:  # noqa: BLE001
            pass
        calls.append({"q": tuple(q.shape), "mask": None if attn_mask is None else tuple(attn_mask.shape),
                      "mask_stride": None if attn_mask is None else tuple(attn_mask.stride()),
                      "dtype": str(q.dtype).replace("torch.", ""), "choice": choice})
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
    return real, spy


def part_attention(ctx) -> dict:
    """Every recipe model steps with math attention excluded; which kernel each SDPA call gets."""
    import models
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = RECIPE_MODELS if not ctx.dry_run else {"mae_swin_pico_128": 2, "simmim_swin_pico_128": 2,
                                                   "mae_hiera_pico_128": 2, "mixmim_pico": 2,
                                                   "greenmim_swin_pico_patch4_win6_dec64b1": 2}
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        fused.append(SDPBackend.CUDNN_ATTENTION)
    rows, ok = [], True
    for name, batch in names.items():
        torch.manual_seed(0)
        model = models.create_model(name, **_model_kwargs(name)).to(ctx.device).train()
        c = model.contract
        imgs = torch.randn(batch, 3, c.input_size, c.input_size, device=ctx.device)
        mask, sm = _cpu_masks(model, batch, 0)
        mask, sm = mask.to(ctx.device), None if sm is None else sm.to(ctx.device)
        calls: list = []
        real, spy = _sdpa_spy(calls)
        F.scaled_dot_product_attention = spy
        error = ""
        try:
            if ctx.dry_run:  # the CPU has no fused kernel with mask gradients: record the calls only
                _step(model, imgs, mask, sm, torch.bfloat16)
            else:
                with sdpa_kernel(fused):
                    _step(model, imgs, mask, sm, torch.bfloat16)
        except RuntimeError as e:
            error = str(e).splitlines()[0][:200]
        finally:
            F.scaled_dot_product_attention = real
        choices = sorted({str(x["choice"]) for x in calls})
        aligned = all(x["mask_stride"] is None or (x["mask_stride"][-1] == 1 and all(s % 8 == 0 for s in x["mask_stride"][:-1]))
                      for x in calls)
        four_d = all(len(x["q"]) == 4 for x in calls)
        r = {"model": name, "batch": batch, "sdpa_calls": len(calls), "kernels": choices, "no_math_needed": not error,
             "error": error, "masks_aligned": aligned, "four_dim": four_d,
             "shapes": sorted({(x["q"], x["mask"]) for x in calls}, key=str)[:12]}
        r["ok"] = (not error or ctx.dry_run) and aligned and four_d and (ctx.dry_run or "MATH" not in choices)
        ok &= r["ok"]
        rows.append(r)
        ctx.say(f"  {name:36s} {len(calls):3d} calls, kernels {','.join(choices)}; aligned masks {aligned}; "
                f"4-D {four_d}" + (f"; ERROR {error}" if error else ""))
        del model
    return {"status": "passed" if ok else "failed", "rows": rows,
            "summary": f"{sum(r['ok'] for r in rows)}/{len(rows)} recipe models on fused kernels with aligned 4-D inputs"}


def _attention_cases(dry: bool) -> list[tuple[str, tuple, tuple, bool]]:
    """(name, q shape, mask shape, very negative rows) at the models' window shapes (batch 128)."""
    if dry:
        return [("per-window n=16", (8, 2, 16, 8), (8, 2, 16, 16), False), ("negative rows", (8, 2, 16, 8), (8, 2, 16, 16), True)]
    return [("UM-MAE Swin-T s1 per-window n=64", (2048, 3, 64, 32), (2048, 3, 64, 64), False),
            ("SimMIM Swin-T s1 shared n=256", (2048, 3, 256, 32), (1, 3, 256, 256), False),
            ("Swin-T s4 n=16", (128, 24, 16, 32), (128, 24, 16, 16), False),
            ("n=64, rows of logits < -90", (2048, 3, 64, 32), (2048, 3, 64, 64), True)]


def part_sdpa_agreement(ctx) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = ctx.device
    backends = ["MATH"] if ctx.dry_run else ["CUDNN_ATTENTION", "EFFICIENT_ATTENTION"]
    rows, ok = [], True
    for name, qs, ms, negative in _attention_cases(ctx.dry_run):
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(qs, generator=gen).to(dev) for _ in range(3))
        bias = torch.randn(ms, generator=gen).to(dev) * 2
        if negative:  # every logit of a quarter of the rows far below -88.7 (exp underflows in fp32)
            bias[..., ::4, :] -= 200.0
        go = torch.randn(qs, generator=gen).to(dev)

        # every input as bf16 holds it (the mask too: -200 + x keeps 8 bits), so the comparison measures
        # the kernels, not the rounding of their inputs
        q, k, v, bias, go = (x.to(torch.bfloat16).float() for x in (q, k, v, bias, go))

        def run(dtype, backend, ins=(q, k, v, bias)):
            t = [x.detach().to(dtype).requires_grad_() for x in ins]
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                out = F.scaled_dot_product_attention(*t[:3], attn_mask=t[3])
            out.backward(go.to(dtype))
            return [out.detach().float()] + [x.grad.float() for x in t]
        ref = run(torch.float32, "MATH")
        for backend in backends:
            if not hasattr(SDPBackend, backend):
                continue
            try:
                got = run(torch.bfloat16, backend)
            except RuntimeError as e:
                rows.append({"case": name, "backend": backend, "available": False, "error": str(e).splitlines()[0][:160]})
                ctx.say(f"  {name:34s} {backend:20s} not available here: {str(e).splitlines()[0][:80]}")
                continue
            errs = {k: float((g - r).norm() / r.norm().clamp_min(1e-30)) for k, g, r in
                    zip(("out", "dq", "dk", "dv", "dmask"), got, ref)}
            nans = sum(int(torch.isnan(g).sum()) for g in got)
            r = {"case": name, "backend": backend, "available": True, "rel_err": errs, "nans": nans}
            r["ok"] = nans == 0 and max(errs.values()) < 3e-2
            ok &= r["ok"]
            rows.append(r)
            ctx.say(f"  {name:34s} {backend:20s} " + " ".join(f"{k} {e:.1e}" for k, e in errs.items())
                    + f" NaN {nans} {'ok' if r['ok'] else 'DISAGREES'}")
    bad = [f"{r['backend']} on {r['case']}" for r in rows if r.get("available") and not r["ok"]]
    return {"status": "passed" if ok else "failed", "rows": rows,
            "summary": "bf16 kernels agree with fp32 math" if ok else "disagree: " + "; ".join(bad)}


def part_bias_precision(ctx) -> dict:
    """UM-MAE Swin-T stage 1 (blocks 0-1) under bf16 autocast vs float32 (TF32 off)."""
    from models import swin
    from models.mae import MaskedAutoencoderSwin
    from models.masking import uniform_mask
    batch = 128 if not ctx.dry_run else 2
    torch.manual_seed(0)
    m = MaskedAutoencoderSwin(img_size=256, embed_dim=96, depths=(2, 2), num_heads=(3, 3), window_size=8,
                              decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).train()
    mask = uniform_mask(batch, m.token_size, generator=torch.Generator().manual_seed(0))
    captured = {}

    def capture(x, positions):
        captured.update(x=x.detach(), positions=positions)
        raise StopIteration
    m.run_blocks = capture
    try:
        m.forward_encoder(torch.randn(batch, 3, 256, 256, generator=torch.Generator().manual_seed(2)), mask)
    except StopIteration:
        pass
    blocks = m.blocks[:2].to(ctx.device)
    x0, pos = captured["x"].to(ctx.device), captured["positions"]
    weight = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4)).to(ctx.device)

    def grads(amp: bool) -> dict:
        blocks.zero_grad(set_to_none=True)
        p = swin.Positions(pos.pos.to(ctx.device), pos.extent, max_step=pos.max_step)
        with tf32_off(), torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            y = x0
            for blk in blocks:
                y = blk(y, p)
        (y.float() * weight).sum().backward()
        return {n: q.grad.detach().clone() for n, q in blocks.named_parameters()}
    ref, bf = grads(False), grads(True)
    err = {n: float((bf[n] - ref[n]).norm() / ref[n].norm()) for n in
           ("0.attn.posmlp.0.weight", "1.attn.posmlp.0.weight", "0.attn.qkv.weight", "1.attn.qkv.weight",
            "0.mlp.fc1.weight")}
    posmlp = max(err["0.attn.posmlp.0.weight"], err["1.attn.posmlp.0.weight"])
    qkv = max(err["0.attn.qkv.weight"], err["1.attn.qkv.weight"])
    ok = posmlp <= 3 * qkv
    return {"status": "passed" if ok else "failed", "rel_err": err, "batch": batch,
            "summary": f"position MLP {posmlp:.2%} vs qkv {qkv:.2%} (bound: 3x qkv)"}


def decode_race(repeats: int = 50, images: int = 64, variant: str = "ours", size: int = 256) -> dict:
    """GPU decoding while the stream still has queued work that reads freed tensors (the pattern
    under which nvJPEG's out-of-stream writes corrupt memory). Per repeat: ``images`` tensors of a
    decoded image's size filled with a known value; ~100 ms of matmuls queued; one sum per tensor
    queued after them; the tensors freed; then a batch decoded: ``variant`` "ours" through
    util.decode.decode_planned (side stream), "current_stream" with torchvision's decode_jpeg on the
    training stream. Returns the count of repeats with a wrong sum and of wrong sums."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from util.decode import decode_planned
    dev = torch.device("cuda")
    datas = [photo_jpeg(500, 375, 100 + i) for i in range(images)]
    planned = _planned(datas, size)
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    a = torch.randn(4096, 4096, device=dev)
    b = torch.randn(4096, 4096, device=dev) / 64
    c = torch.empty_like(a)
    torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    n_mm = max(1, int(0.1 / ((time.perf_counter() - t) / 5)))
    bad_runs = bad_sums = 0
    for r in range(repeats):
        value = 1 + r % 200
        victims = [torch.full((3, 375, 500), value, dtype=torch.uint8, device=dev) for _ in range(images)]
        torch.cuda.synchronize()
        for _ in range(n_mm):
            torch.mm(a, b, out=c)
        sums = torch.stack([x.sum(dtype=torch.int64) for x in victims])
        del victims
        if variant == "current_stream":
            out = decode_jpeg(raw, mode=ImageReadMode.RGB, device=dev)
        else:
            out, _ = decode_planned(planned, size, dev)
        torch.cuda.synchronize()
        wrong = int((sums != value * 3 * 375 * 500).sum())
        bad_runs += wrong > 0
        bad_sums += wrong
        del out
    return {"variant": variant, "repeats": repeats, "images": images, "queued_matmuls": n_mm,
            "corrupted_runs": bad_runs, "corrupted_sums": bad_sums}


def part_decode_race(ctx) -> dict:
    if ctx.dry_run:
        return {"status": "planned", "plan": "decode_race(repeats=50, images=64) for variants current_stream, ours"}
    rows = [decode_race(50, 64, v) for v in ("current_stream", "ours")]
    for r in rows:
        ctx.say(f"  {r['variant']:15s} {r['corrupted_runs']}/{r['repeats']} runs corrupted "
                f"({r['corrupted_sums']} sums), {r['queued_matmuls']} matmuls queued")
    ours = rows[1]
    return {"status": "passed" if ours["corrupted_runs"] == 0 else "failed", "rows": rows,
            "summary": f"util.decode: {ours['corrupted_runs']}/50 corrupted; torchvision on the training stream: "
                       f"{rows[0]['corrupted_runs']}/50"}


def part_decode_awkward(ctx) -> dict:
    import warnings

    from util.decode import DecodeStats, decode_planned
    files = awkward_jpegs()
    names = list(files)
    planned = _planned(list(files.values()), 64, [f"{n}.jpg" for n in names])
    level = 1 / 255 / 0.225
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        cpu, ok_cpu = decode_planned(planned, 64, torch.device("cpu"), float_kernel=True)
        stats = DecodeStats()
        if ctx.dry_run:
            dev, ok_dev = cpu, ok_cpu
        else:
            dev, ok_dev = decode_planned(planned, 64, ctx.device, stats)
            dev = dev.cpu()
    rows = []
    for i, n in enumerate(names):
        diff = float(((dev[i] - cpu[i]).abs() / level).mean())
        rows.append({"file": n, "ok_cpu": int(ok_cpu[i]), "ok_gpu": int(ok_dev[i]), "mean_diff_levels": diff})
        ctx.say(f"  {n:16s} ok cpu/gpu {int(ok_cpu[i])}/{int(ok_dev[i])}  mean |gpu - cpu| {diff:.2f} grey levels")
    # a truncated file: libjpeg (CPU) refuses it, nvJPEG may return the decoded part; reported, not judged
    ok = all(r["ok_cpu"] == r["ok_gpu"] and (not r["ok_cpu"] or r["mean_diff_levels"] < 1.5)
             for r in rows if r["file"] != "truncated")
    return {"status": "passed" if ok else "failed", "rows": rows, "pil_fallbacks": stats.pil_fallbacks,
            "summary": f"{sum(r['ok_gpu'] for r in rows)}/{len(rows)} read; {stats.pil_fallbacks} by PIL after the "
                       f"GPU decoder refused them"}


def _ddp_args(**kw) -> argparse.Namespace:
    base = dict(accum_iter=2, amp="bf16", print_freq=100, clip_grad=None, seed=0, epochs=1, lr=1e-4, min_lr=0.0,
                warmup_epochs=0, channels_last=False, num_workers=0, dist_url="env://", dist_timeout=3.0,
                compile=False)
    base.update(kw)
    return argparse.Namespace(**base)


def part_ddp(ctx) -> dict:
    """One-process group as torchrun builds it, DDP as the programs wrap it, two accumulated steps."""
    import models
    from engine_pretrain import MaskSampler, pretrain_one_epoch
    from util import stop as stop_module
    from util.distributed import cleanup, free_port, init_distributed, is_dist
    from util.run import wrap_for_training
    from util.stop import StopAgreement
    dev_name = "cuda" if not ctx.dry_run else "cpu"
    saved_env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    name = "mae_swin_tiny_256" if not ctx.dry_run else "mae_swin_pico_128"
    args = _ddp_args(device=dev_name, amp="bf16" if not ctx.dry_run else "none")
    result = {}
    try:
        init_distributed(args)
        device = torch.device(args.device)
        result["process_group"] = is_dist() and args.distributed
        result["backend"] = torch.distributed.get_backend()
        torch.manual_seed(0)
        model = models.create_model(name, **_model_kwargs(name)).to(device)
        ddp = wrap_for_training(model, args, device)
        result["ddp"] = isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        result["gradient_as_bucket_view"] = bool(getattr(ddp, "gradient_as_bucket_view", False))
        c = model.contract
        batch = 8 if not ctx.dry_run else 2
        loader = [(torch.randn(batch, 3, c.input_size, c.input_size), torch.zeros(batch, dtype=torch.long),
                   torch.ones(batch, dtype=torch.long)) for _ in range(4)]
        masks = MaskSampler(c.token_size, 0.75, True, c.vis_mask_ratio, seed=0, device=device)
        masks.set_epoch(0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        stats = pretrain_one_epoch(ddp, loader, opt, None, device, 0, args, masks)
        result["loss"] = stats["loss"]
        result["peak_mem_mb"], result["peak_reserved_mb"] = stats["peak_mem_mb"], stats.get("peak_reserved_mb")
        # the stop agreement's device path, as with several ranks, under CUDA's sync debug mode
        if device.type == "cuda":
            real_world = stop_module.get_world_size
            stop_module.get_world_size = lambda: 2
            agree = StopAgreement(lambda: False, device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                decisions = [agree(s, 1, 100) for s in (3, 7, 11)]
                result["stop_agreement_syncs"] = 0
            except RuntimeError as e:
                decisions, result["stop_agreement_syncs"] = [], str(e).splitlines()[0][:160]
            finally:
                torch.cuda.set_sync_debug_mode(0)
                stop_module.get_world_size = real_world
            result["stop_decisions"] = decisions
        cleanup()
        result["cleanup"] = not is_dist()
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    ok = (result.get("process_group") and result.get("ddp") and result.get("gradient_as_bucket_view")
          and np.isfinite(result.get("loss", float("nan"))) and result.get("cleanup")
          and result.get("stop_agreement_syncs", 0) == 0)
    return {"status": "passed" if ok else "failed", **result,
            "summary": f"{result.get('backend')} group of 1, DDP (bucket views {result.get('gradient_as_bucket_view')}), "
                       f"loss {result.get('loss', float('nan')):.4f}, stop agreement syncs: "
                       f"{result.get('stop_agreement_syncs', 'n/a')}"}


def _speed_argv(models_: tuple, out: Path) -> list[str]:
    return ["--models", models_[1], models_[0], "--batch_size", "128", "--amp", "bf16", "--device", "cuda",
            "--steps", "10", "--warmup", "3", "--json", str(out)]


def part_speed(ctx) -> dict:
    jobs = [("Swin-T", SWIN_T, ctx.out / "gpu_swin_t_b128.json"), ("PVT-S", PVT_S, ctx.out / "gpu_pvt_s_b128.json")]
    plan = "; ".join("python tools/benchmark.py " + " ".join(_speed_argv(m, o)) for _, m, o in jobs)
    if ctx.dry_run:
        return {"status": "planned", "plan": plan}
    from tools import benchmark
    rows = []
    for label, pair, out in jobs:
        report = benchmark.main(_speed_argv(pair, out))
        by = {r["model"]: r for r in report["results"]}
        um, sim = by[pair[0]], by[pair[1]]
        rows.append({"pair": label, "um_mae_images_per_s": um["images_per_s"], "simmim_images_per_s": sim["images_per_s"],
                     "step_ratio": um["ratios"]["time"], "memory_ratio_allocated": 1 / um["ratios"]["memory"],
                     "memory_ratio_reserved": 1 / um["ratios"]["reserved"] if um["ratios"].get("reserved") else None,
                     "flops_ratio": um["ratios"]["flops"]})
    s = "; ".join(f"{r['pair']}: UM-MAE {r['um_mae_images_per_s']:.0f} img/s, {r['step_ratio']:.2f}x SimMIM's speed, "
                  f"memory {r['memory_ratio_allocated']:.2f}x allocated / {r['memory_ratio_reserved'] or float('nan'):.2f}x "
                  f"reserved" for r in rows)
    return {"status": "passed", "rows": rows, "plan": plan, "summary": s}


def _make_jpeg_shards(folder: Path, n: int, distinct: int = 256) -> str:
    """``n`` 500x375 q90 JPEG files (``distinct`` generated scenes, repeated: decoding costs the same) in
    tar shards (tools/make_shards.py); returns the --data_path."""
    from tools import make_shards
    src = folder / "jpegs"
    src.mkdir(parents=True)
    scenes = [photo_jpeg(500, 375, i) for i in range(min(n, distinct))]
    for i in range(n):
        (src / f"img{i:05d}.jpg").write_bytes(scenes[i % len(scenes)])
    make_shards.main(["--data_path", str(src), "--output_dir", str(folder / "shards"), "--shard_size", "256",
                      "--splits", "train"])
    return str(folder / "shards")


def _pretrain_argv(data: str, decode: str, out: Path, workers: int) -> list[str]:
    return ["main_pretrain.py", "--model", "mae_swin_tiny_256", "--mask_regular", "--vis_mask_ratio", "0.25",
            "--norm_pix_loss", "--batch_size", "128", "--epochs", "1", "--warmup_epochs", "0", "--print_freq", "4",
            "--data_path", data, "--decode", decode, "--num_workers", str(workers), "--amp", "bf16",
            "--output_dir", str(out), "--log_dir", "", "--vis_freq", "0"]


def part_loader(ctx) -> dict:
    n = ctx.loader_images if not ctx.dry_run else 8
    workers = min(12, max(1, (os.cpu_count() or 2) - 2))
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_loader_"))
    try:
        t = time.perf_counter()
        data = _make_jpeg_shards(tmp, n)
        made = time.perf_counter() - t
        plans = [" ".join(_pretrain_argv(data, d, tmp / d, workers)) for d in ("fast", "gpu")]
        if ctx.dry_run:
            return {"status": "planned", "plan": "python " + "; python ".join(plans),
                    "summary": f"{n} JPEGs in shards in {made:.1f} s"}
        rows = []
        for decode in ("fast", "gpu"):
            cmd = [sys.executable] + _pretrain_argv(data, decode, tmp / decode, workers)
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(60, ctx.left() - 30))
            wall = time.perf_counter() - t
            row = {"decode": decode, "returncode": proc.returncode, "wall_s": wall}
            log = tmp / decode / "log.txt"
            if proc.returncode == 0 and log.is_file():
                rec = json.loads(log.read_text().splitlines()[0])
                row.update(images_per_s=rec.get("train_images_per_sec"), data_wait_share=rec.get("train_data_wait_share"),
                           peak_mem_mb=rec.get("train_peak_mem_mb"), peak_reserved_mb=rec.get("train_peak_reserved_mb"))
            else:
                row["error"] = (proc.stdout[-800:] + proc.stderr[-1500:]).strip()
            row["progress"] = [l for l in proc.stdout.splitlines() if "img/s" in l][-3:]
            rows.append(row)
            ctx.say(f"  --decode {decode}: " + (f"{row['images_per_s']:.0f} img/s with data, waiting for data "
                                                f"{row['data_wait_share']:.0%}" if "images_per_s" in row
                                                else f"FAILED ({proc.returncode})"))
        ok = all(r["returncode"] == 0 for r in rows)
        return {"status": "passed" if ok else "failed", "rows": rows, "images": n, "workers": workers,
                "summary": "; ".join(f"{r['decode']} {r.get('images_per_s') or 0:.0f} img/s, data "
                                     f"{(r.get('data_wait_share') or 0):.0%}" for r in rows)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def part_torchrun(ctx) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_torchrun_"))
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port",
            str(__import__("util.distributed", fromlist=["free_port"]).free_port()), "main_pretrain.py",
            "--model", "mae_swin_tiny_256", "--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss",
            "--batch_size", "32", "--epochs", "2", "--num_workers", "8", "--output_dir", str(tmp / "run"),
            "--log_dir", ""]
    runs = [base + ["--amp", "bf16", "--exit_after_epoch", "0"], base + ["--amp", "fp16", "--allow_changed_args"]]
    if ctx.dry_run:
        shutil.rmtree(tmp, ignore_errors=True)
        return {"status": "planned", "plan": " ; ".join("python " + " ".join(shlex.quote(a) for a in r[1:]) for r in runs)}
    rows = []
    try:
        for cmd in runs:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(60, ctx.left() - 20))
            summary = [l for l in proc.stdout.splitlines() if l.startswith("summary:") or "pretraining" in l][-2:]
            rows.append({"returncode": proc.returncode, "summary_lines": summary,
                         "tail": "" if proc.returncode == 0 else (proc.stdout[-600:] + proc.stderr[-1200:])})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = all(r["returncode"] == 0 for r in rows)
    return {"status": "passed" if ok else "failed", "rows": rows,
            "summary": " | ".join((r["summary_lines"] or ["(no summary line)"])[-1][:120] for r in rows)}


PARTS: list[tuple[str, Callable, bool, float]] = [  # name, function, runs on the CPU in --dry-run, budget (s)
    ("versions", part_versions, True, 10),
    ("cpu_vs_gpu", part_cpu_vs_gpu, True, 45),
    ("attention", part_attention, True, 30),
    ("sdpa_agreement", part_sdpa_agreement, True, 20),
    ("bias_precision", part_bias_precision, True, 15),
    ("decode_race", part_decode_race, False, 40),
    ("decode_awkward", part_decode_awkward, True, 10),
    ("ddp_nccl", part_ddp, True, 20),
    ("speed", part_speed, False, 60),
    ("loader", part_loader, True, 90),
    ("torchrun", part_torchrun, False, 60),
]


class Context:
    def __init__(self, args) -> None:
        self.dry_run = args.dry_run
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.out = Path(args.out)
        self.loader_images = args.loader_images
        self.start = time.perf_counter()
        self.budget = args.budget
        self.versions: dict = {}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def say(self, line: str) -> None:
        print(line, flush=True)


def _table(parts: list[dict]) -> str:
    lines = ["| part | status | seconds | result |", "|---|---|---|---|"]
    for p in parts:
        lines.append(f"| {p['part']} | {p['status']} | {p.get('seconds', 0):.0f} | "
                     f"{(p.get('summary') or p.get('plan') or p.get('error') or '').replace('|', '/')[:300]} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run the parts that need no CUDA, on the CPU, and print the plan")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for gpu_check.json")
    p.add_argument("--budget", type=float, default=400.0, help="seconds for all parts (a part that would not fit is skipped)")
    p.add_argument("--only", nargs="+", default=None, choices=[n for n, *_ in PARTS], help="run only these parts")
    p.add_argument("--loader_images", type=int, default=2048, help="JPEGs of the loader part")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device is available here; use --dry-run for the CPU parts and the plan")
    ctx = Context(args)
    ctx.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)) if not args.dry_run else 1)
    if not args.dry_run:
        from util.run import gpu_numerics
        gpu_numerics(ctx.device)   # TF32 as the programs (parts that compare fp32 turn it off themselves)
    report = {"dry_run": args.dry_run, "command": "bash scripts/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": []}
    path = ctx.out / "gpu_check.json"
    for name, fn, cpu_ok, budget in PARTS:
        if args.only and name not in args.only and name != "versions":
            continue
        t = time.perf_counter()
        if args.dry_run and not cpu_ok:
            res = fn(ctx)
        elif ctx.left() < budget:
            res = {"status": "skipped", "summary": f"{ctx.left():.0f} s left of the budget, this part needs ~{budget:.0f} s"}
        else:
            try:
                res = fn(ctx)
            except Exception as e:  # noqa: BLE001 (one broken part must not hide the others)
                res = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:400], "traceback": traceback.format_exc()[-2000:]}
        res = {"part": name, **res, "seconds": time.perf_counter() - t}
        report["parts"].append(res)
        if name == "versions":
            report["versions"] = ctx.versions
            v = ctx.versions
            print(f"torch {v['torch']} (CUDA {v['torch_cuda']}), torchvision {v['torchvision']} (CUDA "
                  f"{v['torchvision_cuda']}), timm {v['timm']}, python {v['python']}" +
                  (f"; {v['gpu']} (sm {v['capability']}, {v['gpu_memory_gib']} GiB), cuDNN {v['cudnn']}, NCCL {v['nccl']}"
                   if "gpu" in v else "; no GPU") + (f"; carried wheels: {', '.join(_CARRIED)}" if _CARRIED else ""),
                  flush=True)
            if args.dry_run:
                print("plan (--dry-run: the parts marked 'planned' need CUDA):", flush=True)
                for n, _, c, b in PARTS:
                    print(f"  {n:15s} ~{b:.0f} s on the GPU{'' if c else '  (GPU only)'}", flush=True)
        else:
            print(f"[{name}] {res['status']}: {res.get('summary') or res.get('plan') or res.get('error', '')}", flush=True)
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    report["seconds"] = time.perf_counter() - ctx.start
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(_table(report["parts"]), flush=True)
    print(f"written: {path}", flush=True)
    return report


if __name__ == "__main__":
    rep = main()
    sys.exit(0 if all(p["status"] in ("passed", "planned", "skipped") for p in rep["parts"]) else 1)
