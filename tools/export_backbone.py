"""Export an encoder for downstream use: encoder-only weights + a JSON describing the architecture.

    python tools/export_backbone.py --checkpoint work_dirs/pretrain/checkpoint-199.pth \
        --model swin_tiny_256 --output exported/swin_tiny_ummae

writes ``backbone.pth`` (a plain state dict: no head, no decoder, loads with weights_only=True)
and ``backbone.json`` (model name, input size, stage channels and strides, source file).
``load_backbone(folder)`` rebuilds it; ``model.forward_pyramid(imgs)`` then gives the four
stage feature maps (N, C_s, H/stride_s, W/stride_s) for a dense-prediction head (FINETUNE.md).

``--checkpoint`` may be a pretraining or finetuning checkpoint, or a detection or segmentation one
(the backbone classifier inside it, ``DENSE_BODIES``); ``--model`` defaults to the checkpoint's
classifier.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.cli import ArgumentParser, HelpFormatter, answer_usage_first, run_main  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a pretraining, finetuning, detection or segmentation checkpoint")
    p.add_argument("--model", default=None,
                   help="classifier architecture, e.g. swin_tiny_256 (default: the checkpoint's classifier)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--input_size", type=int, default=None, help="image size (default: the model's native size)")
    return p


# --help and flag errors answer before torch loads
answer_usage_first(get_args_parser, __name__ == "__main__")

import torch  # noqa: E402

import models  # noqa: E402
from engine.checkpoint import safe_load, save_atomic, stored_model_name, unwrap_state_dict  # noqa: E402
from errors import UsageError  # noqa: E402
from config.rules import unknown_choice  # noqa: E402
from util.pretrained import load_state, read_weights  # noqa: E402

# Where the dense programs' models keep the classifier they were built on (models.dense.DenseBackbone
# ``body``): key prefix -> what wrote the file. The rest of such a file (adapters, FPN, heads and a ViT's
# simple feature pyramid ``sfp``) belongs to the dense model, not to the classifier.
DENSE_BODIES = {
    "neck.backbone.body.": "a GFL detection checkpoint (main_detection.py)",
    "model.backbone.backbone.body.": "a Mask R-CNN detection checkpoint (main_detection.py --detector mask_rcnn)",
    "backbone.body.": "a segmentation checkpoint (main_segmentation.py)",
}


def dense_layout(sd: dict) -> str:
    """The DENSE_BODIES prefix of a dense checkpoint's state dict ('' for any other file)."""
    return next((prefix for prefix in DENSE_BODIES if any(k.startswith(prefix) for k in sd)), "")


def classifier_name(given: str | None, checkpoint: str) -> str:
    """The classifier to export: --model, else the one the checkpoint's model is or finetunes into.
    A pretraining name is answered with its classifier; a typo with the close classifier names."""
    classifiers = models.list_models(task="classify")
    name = given or stored_model_name(checkpoint)
    if name is None:
        raise UsageError(f"{checkpoint} does not name its model: give --model (a classifier, e.g. swin_tiny_256)")
    if name in classifiers:
        return name
    if name in models.list_models(task="pretrain"):
        if given is None:
            return models.classifier_for(name)
        raise UsageError(f"--model {name} is a pretraining model; its classifier is {models.classifier_for(name)}: use "
                         f"--model {models.classifier_for(name)} (a pretraining checkpoint loads into it)")
    raise UsageError(unknown_choice("model", name, classifiers, "valid classifiers"))


def export_backbone(checkpoint: str, model_name: str | None, output: str, input_size: int | None = None) -> Path:
    """Write the encoder of ``checkpoint`` (pretraining, finetuning, detection or segmentation) as the
    classifier ``model_name`` (None: the checkpoint's) without head into ``output``."""
    model_name = classifier_name(model_name, checkpoint)
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
    # read once, at the limit for tools (engine.safe_archive): a dense checkpoint's heads can outweigh the
    # classifier many times over
    sd = unwrap_state_dict(read_weights(checkpoint))
    prefix = dense_layout(sd)
    if prefix:  # the classifier inside a detection / segmentation model: its own keys behind the prefix
        body = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        report = load_state(model, body, f"{checkpoint} ({DENSE_BODIES[prefix]})")
    else:
        report = load_state(model, sd, str(checkpoint))
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    size = input_size or model.contract.input_size
    with torch.no_grad():
        feats = model.forward_pyramid(torch.zeros(1, 3, size, size))
    meta = {"model": model_name, "input_size": int(size), "num_tensors": len(encoder),
            "stage_channels": [int(f.shape[1]) for f in feats],
            "stage_strides": [int(size // f.shape[-1]) for f in feats],
            "source_checkpoint": str(checkpoint), "load_report": report.summary(),
            "usage": "models.create_model(model, num_classes=0, img_size=input_size); "
                     "load_state_dict(torch.load('backbone.pth', weights_only=True), strict=False); forward_pyramid"}
    if prefix:
        meta["source_model"] = (f"{DENSE_BODIES[prefix]}: the classifier under {prefix} is exported; its "
                                f"{len(sd) - len(body)} other tensors (adapters, neck, heads, a ViT's simple feature "
                                f"pyramid) are not")
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_atomic(encoder, out / "backbone.pth")
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
    a = get_args_parser().parse_args()
    out = export_backbone(a.checkpoint, a.model, a.output, a.input_size)
    print(f"wrote {out / 'backbone.pth'} and {out / 'backbone.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
