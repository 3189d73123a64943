"""Export an encoder for downstream use: encoder-only weights + a JSON describing the architecture.

    python tools/export_backbone.py --checkpoint work_dirs/pretrain/checkpoint-199.pth \
        --model swin_tiny_256 --output exported/swin_tiny_ummae

writes ``backbone.pth`` (a plain state dict: no head, no decoder, loads with weights_only=True)
and ``backbone.json`` (model name, input size, stage channels and strides, source file).
``load_backbone(folder)`` rebuilds it; ``model.forward_pyramid(imgs)`` then gives the four
stage feature maps (N, C_s, H/stride_s, W/stride_s) for a dense-prediction head (FINETUNE.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from util.checkpoint import safe_load, save_atomic  # noqa: E402
from util.cli import UsageError, run_main  # noqa: E402
from util.pretrained import load_pretrained  # noqa: E402


def export_backbone(checkpoint: str, model_name: str, output: str, input_size: int | None = None) -> Path:
    if model_name not in models.list_models(task="classify"):
        raise UsageError(f"unknown --model {model_name!r}; valid: {', '.join(models.list_models(task='classify'))}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file: name a folder (backbone.pth and backbone.json go into it)")
    kwargs = {"num_classes": 0}
    if input_size:
        kwargs["img_size"] = input_size
    try:
        model = models.create_model(model_name, **kwargs).eval()
    except ValueError as e:  # e.g. an input size the model's windows or patches do not fit
        raise UsageError(f"--input_size {input_size}: {e}") from None
    report = load_pretrained(model, checkpoint)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    size = input_size or model.contract.input_size
    with torch.no_grad():
        feats = model.forward_pyramid(torch.zeros(1, 3, size, size))
    meta = {"model": model_name, "input_size": int(size), "num_tensors": len(sd),
            "stage_channels": [int(f.shape[1]) for f in feats],
            "stage_strides": [int(size // f.shape[-1]) for f in feats],
            "source_checkpoint": str(checkpoint), "load_report": report.summary(),
            "usage": "models.create_model(model, num_classes=0, img_size=input_size); "
                     "load_state_dict(torch.load('backbone.pth', weights_only=True), strict=False); forward_pyramid"}
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_atomic(sd, out / "backbone.pth")
        (out / "backbone.json").write_text(json.dumps(meta, indent=2))
    except OSError as e:
        raise UsageError(f"--output {out} cannot be written: {e.strerror or e}") from None
    return out


def load_backbone(folder: str | Path) -> torch.nn.Module:
    """Rebuild an exported backbone (a classifier without head) ready for ``forward_pyramid``."""
    folder = Path(folder)
    meta = json.loads((folder / "backbone.json").read_text())
    model = models.create_model(meta["model"], num_classes=0, img_size=meta["input_size"])
    result = model.load_state_dict(safe_load(folder / "backbone.pth"), strict=False)
    unexpected_missing = [k for k in result.missing_keys if not k.startswith("fc_norm.")]
    if unexpected_missing or result.unexpected_keys:
        raise RuntimeError(f"exported backbone does not match {meta['model']}: missing {unexpected_missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="pretraining or finetuning checkpoint")
    p.add_argument("--model", required=True, help="classifier architecture, e.g. swin_tiny_256")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--input_size", type=int, default=None)
    a = p.parse_args()
    out = export_backbone(a.checkpoint, a.model, a.output, a.input_size)
    print(f"wrote {out / 'backbone.pth'} and {out / 'backbone.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
