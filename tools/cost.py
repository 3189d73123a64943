"""What a pretraining model costs, without training: the cost report of main_pretrain.py for any model.

    python tools/cost.py mae_swin_tiny_256 simmim_swin_tiny_256 --batch_size 128 --amp bf16 --gpu H100
    python tools/cost.py --all --input_size 224 --json benchmarks/cost_all_224.json

Per model, on the CPU (no step is timed): parameters; forward + backward FLOPs of one training image at
--batch_size, counted as the training program counts them (engine_pretrain.train_flops_per_image:
torch's flop counter under the recipe's masks); the bytes autograd keeps for backward per image
(tools/benchmark.py's saved_activation_bytes under autocast at --amp, at 2 and 4 images, per image at
--batch_size); the
largest batch whose saved activations and AdamW training state (16 bytes per parameter: weights,
gradients and two moments in fp32) fit --gpu_memory_gb, an estimate that leaves out the allocator's
workspace and fragmentation; and the hours of one --gpu per 100 epochs of --images at full
utilisation (the data-sheet peak of engine.record.GPU_PEAK_TFLOPS): a lower bound; a run's measured
MFU (its cost line) turns it into a projection.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import main_pretrain
import models
from engine.record import GPU_PEAK_TFLOPS, write_report
from engine_pretrain import per_image_at, sample_batch, train_flops_per_image
from tools.benchmark import saved_activation_bytes

ADAMW_BYTES_PER_PARAM = 16   # fp32 weights, gradients, exp_avg and exp_avg_sq


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Cost of pretraining models (no training)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="*", help="pretraining models (see --all)")
    p.add_argument("--all", action="store_true", help="every registered pretraining model")
    p.add_argument("--batch_size", default=128, type=int, help="images per GPU")
    p.add_argument("--input_size", default=None, type=int, help="image size (default: each model's native size)")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"],
                   help="the precision the peak is taken at (the count is the same)")
    p.add_argument("--gpu", default="H100", choices=[k for k, _, _ in GPU_PEAK_TFLOPS])
    p.add_argument("--gpu_memory_gb", default=80.0, type=float)
    p.add_argument("--images", default=1_281_167, type=int, help="images per epoch (ImageNet-1k)")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def model_cost(name: str, args) -> dict:
    flags = ["--model", name, "--batch_size", str(args.batch_size), "--device", "cpu", "--amp", "none",
             "--output_dir", tempfile.gettempdir(), "--log_dir", ""]
    if args.input_size is not None:
        flags += ["--input_size", str(args.input_size)]
    config = main_pretrain.parse_args(flags)
    torch.manual_seed(0)
    model = models.create_model(name, **config.model_kwargs(models.describe_class(name).build_options)).train()
    params = sum(p.numel() for p in model.parameters())
    flops = train_flops_per_image(model, config)
    gen = torch.Generator().manual_seed(0)
    saved = [saved_activation_bytes(model, *sample_batch(config, model, b, gen, torch.device("cpu")), args.amp,
                                    torch.device("cpu")) for b in (2, 4)]   # under the CPU's autocast at --amp
    per_image = per_image_at(args.batch_size, *saved)
    room = args.gpu_memory_gb * 2 ** 30 - ADAMW_BYTES_PER_PARAM * params
    half, single = next((h, s) for k, h, s in GPU_PEAK_TFLOPS if k == args.gpu)
    peak = (half if args.amp != "none" else single) * 1e12
    return {"model": name, "input_size": config.input_size, "batch_size": args.batch_size, "params": params,
            "flops_per_image": flops, "saved_bytes_per_image": per_image,
            "largest_batch": max(int(room // per_image), 0) if per_image > 0 else None,
            "ideal_gpu_hours_per_100_epochs": 100 * args.images * flops / peak / 3600}


def markdown_table(report: dict) -> str:
    a = report["settings"]
    lines = [f"batch {a['batch_size']} per GPU, {a['amp']}, {a['gpu']} ({a['gpu_memory_gb']:.0f} GB), "
             f"{a['images']} images an epoch; hours at 100% utilisation (a lower bound)", "",
             "| model | px | params (M) | GFLOPs / image (fwd+bwd) | saved MB / image | largest batch | "
             "GPU-h / 100 ep (ideal) |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['input_size']} | {r['params'] / 1e6:.1f} | {r['flops_per_image'] / 1e9:.2f} | "
                     f"{r['saved_bytes_per_image'] / 2 ** 20:.1f} | {r['largest_batch']} | "
                     f"{r['ideal_gpu_hours_per_100_epochs']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    names = models.list_models(task="pretrain") if args.all else args.models
    if not names:
        raise SystemExit("name pretraining models or give --all; valid: " + ", ".join(models.list_models(task="pretrain")))
    unknown = [n for n in names if n not in models.list_models(task="pretrain")]
    if unknown:
        raise SystemExit(f"unknown pretraining model(s) {', '.join(unknown)}; valid: "
                         + ", ".join(models.list_models(task="pretrain")))
    report = {"settings": {k: getattr(args, k) for k in ("batch_size", "input_size", "amp", "gpu", "gpu_memory_gb",
                                                          "images")},
              "rows": [model_cost(n, args) for n in names]}
    return write_report(report, markdown_table(report), args.json)


if __name__ == "__main__":
    main()
