"""Load pretrained or finetuned weights into a classifier (``--finetune``).

Accepted files: our pretraining and finetuning checkpoints; the reference's released
pretraining / finetuned checkpoints (``{'model': ..., 'args': Namespace}``); MAE's
official ViT checkpoints (encoder-only ``model``); bare state dicts; ``module.``
prefixes; timm's files (``pytorch_model.bin`` or ``model.safetensors``, e.g. the
``hiera_*_224.mae`` weights) and the original Hiera repository's ``{'model_state': ...}``,
whose key names the model maps itself (``checkpoint_filter``). Every file is read with ``weights_only=True`` (engine.checkpoint.safe_load).

Decoder and mask tokens are dropped; the head is re-initialised when its shape
differs (or when the file has none); absolute position embeddings are resized
(bicubic) when the grid differs. A missing or mis-shaped *encoder* tensor is an
error that names the first offending keys and the model the file looks like.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

import models
from models.channels import ChannelCountError, adapt_input_channels
from models.checkpoint_maps import ForeignCheckpointError, describe_formats, identify
from models.dense import DenseBackbone, has_pyramid
from models.pos_embed import resize_pos_embed
from errors import CheckpointError
from engine.checkpoint import safe_load, unwrap_state_dict

HEAD_PREFIXES = ("head.", "fc_norm.")


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    head_reinitialised: bool = False
    layout: str = ""          # the foreign layout the file was read as (models.checkpoint_maps), if any
    adapted: str = ""         # the patch embedding adapted to the model's channels (models.channels), if it was

    def summary(self) -> str:
        def short(keys):
            return ", ".join(keys[:6]) + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "")
        parts = [f"loaded {self.loaded} tensors from {self.path}" + (f" ({self.layout})" if self.layout else ""),
                 f"missing {len(self.missing)}" + (f" [{short(self.missing)}]" if self.missing else ""),
                 f"unexpected {len(self.unexpected)}" + (f" [{short(self.unexpected)}]" if self.unexpected else "")]
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} pretraining-only tensors (decoder, mask tokens, final norm)")
        if self.resized:
            parts.append(f"resized {', '.join(self.resized)}")
        if self.adapted:
            parts.append(self.adapted)
        if self.head_reinitialised:
            parts.append("head re-initialised")
        return "; ".join(parts)


def guess_architecture(sd: dict) -> str:
    """The registered classifier whose encoder keys and shapes best match a state dict."""
    best, best_score = "unknown", 0.0
    enc = {k: tuple(v.shape) for k, v in sd.items()
           if not k.startswith(models.pretrain_only_prefixes() + HEAD_PREFIXES)}
    for name in models.list_models(task="classify"):
        try:
            with torch.device("meta"):
                ref = models.create_model(name, num_classes=0)
        except Exception:
            continue
        ref_sd = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
        if not ref_sd:
            continue
        common = sum(1 for k, s in ref_sd.items() if enc.get(k) == s and k != "pos_embed")
        score = common / max(len(ref_sd), len(enc))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.5 else "no registered model"


def load_pretrained(model: nn.Module, path: str | Path, head_init_std: float = 2e-5) -> LoadReport:
    """Load ``path`` into ``model`` (a classifier) and return what happened; raise CheckpointError on mismatch."""
    from engine.safe_archive import expect_model
    expect_model(model)  # the file may hold a decoder and optimizer moments too: its limit scales with the model
    return load_state(model, unwrap_state_dict(read_weights(path)), str(path), head_init_std)


def load_state(model: nn.Module, sd: dict, path: str, head_init_std: float = 2e-5) -> LoadReport:
    """``load_pretrained`` for a state dict already read (``path`` names it in messages); works on
    the meta device too, so a test can check every registered pair without weights."""
    report = LoadReport(path, layout=_layout(sd))
    sd = _mapped(model, sd, path)
    contract = model.contract
    pretrain_only = models.pretrain_only_prefixes()  # whichever method wrote the file: each names its own
    own = model.state_dict()
    sd = dict(sd)
    for k in list(sd):
        if k.startswith(pretrain_only) or (k.startswith("norm.") and k not in own):
            report.dropped.append(k)
            del sd[k]
    for k in [k for k in sd if k.startswith("head.")]:
        if k not in own or own[k].shape != sd[k].shape:
            del sd[k]
    try:
        report.adapted = adapt_input_channels(model, sd, path)  # RGB weights into an --in_chans N model
    except ChannelCountError as e:
        raise CheckpointError(str(e)) from None
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        extra = contract.prefix_tokens
        grid = int(round((own["pos_embed"].shape[1] - extra) ** 0.5))
        if sd["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid, extra)
            report.resized.append(f"pos_embed -> {grid}x{grid}")
    tables = [k for k in sd if k.endswith("relative_position_bias_table") and k in own
              and sd[k].shape != own[k].shape and sd[k].shape[-1] == own[k].shape[-1]]
    if tables:  # Swin-style bias tables (timm / GreenMIM / MixMIM classifiers) at another window size
        from timm.layers import resize_rel_pos_bias_table
        for k in tables:
            window = (int(round(own[k].shape[0] ** 0.5)) + 1) // 2
            sd[k] = resize_rel_pos_bias_table(sd[k], (window, window), tuple(own[k].shape))
        report.resized.append(f"{len(tables)} relative position tables -> windows of the model")
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    missing = [k for k in own if k not in sd]
    encoder_missing = [k for k in missing if not k.startswith(HEAD_PREFIXES) and not _is_buffer(model, k)]
    if mismatched or encoder_missing:
        what = []
        if encoder_missing:
            what.append(f"missing encoder tensors {encoder_missing[:5]}")
        if mismatched:
            what.append("mis-shaped " + ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                                  for k in mismatched[:5]))
        raise CheckpointError(f"{path} does not fit {type(model).__name__} ({'; '.join(what)}); the file "
                              f"looks like {guess_architecture(sd)}{_foreign_note(report.layout)}")
    result = model.load_state_dict(sd, strict=False)
    report.missing = list(result.missing_keys)
    report.unexpected = list(result.unexpected_keys)
    report.loaded = len(sd) - len(report.unexpected)
    head = model.get_submodule(contract.head)
    head_keys = [k for k, p in model.named_parameters() if head is not None and p is getattr(head, "weight", None)]
    if isinstance(head, nn.Linear) and head_keys and head_keys[0] not in sd:
        nn.init.trunc_normal_(head.weight, std=head_init_std)
        nn.init.zeros_(head.bias)
        report.head_reinitialised = True
    return report


def load_pretraining_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """``--load_from``: every tensor of a pretraining model from ``path`` (ours, an export, or another
    code base's pretraining checkpoint, models.checkpoint_maps), strictly; CheckpointError otherwise."""
    from engine.safe_archive import expect_model
    expect_model(model)
    sd = unwrap_state_dict(read_weights(path))
    report = LoadReport(str(path), layout=_layout(sd))
    sd = _mapped(model, sd, str(path))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        what = [f"{n} {len(ks)} {ks[:4]}" for n, ks in (("missing", missing), ("unexpected", unexpected),
                                                      ("mis-shaped", mismatched)) if ks]
        raise CheckpointError(f"{path} does not fit {type(model).__name__} ({'; '.join(what)})"
                              f"{_foreign_note(report.layout)}")
    model.load_state_dict(sd, strict=True)
    report.loaded = len(sd)
    return report


def _layout(sd: dict) -> str:
    fmt = identify(sd)
    return f"{fmt.title} layout" if fmt else ""


def _mapped(model: nn.Module, sd: dict, path: str) -> dict:
    """The model's mapping of foreign key layouts onto its own keys (models.contract)."""
    try:
        return dict(model.checkpoint_filter(sd))
    except ForeignCheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _foreign_note(layout: str) -> str:
    return "" if layout else f". Foreign layouts read: {describe_formats()}"


def read_weights(path: str | Path):
    """A checkpoint (engine.checkpoint.safe_load), or a ``.safetensors`` file as timm / the HF hub ship
    them (no pickle at all); the original Hiera repository's ``{'model_state': ...}`` is unwrapped."""
    if str(path).endswith(".safetensors"):
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from None
    ckpt = safe_load(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_state"), dict):
        ckpt = ckpt["model_state"]
    return ckpt


def _is_buffer(model: nn.Module, key: str) -> bool:
    return key in dict(model.named_buffers())


def build_backbone(model_name: str, checkpoint: str = "", drop_path: float = 0.1, img_size: Optional[int] = None,
                   log: Callable[[str], None] = print) -> DenseBackbone:
    """The classifier ``model_name`` (built at its native size unless ``img_size``) with
    ``checkpoint`` loaded (any pretraining / finetuning file util.pretrained accepts; a file
    that does not fit raises CheckpointError naming the model it looks like), head removed.

    The built size only sets the stored position-embedding grid (PVT, ViT), which
    ``forward_pyramid`` resizes to every input; keep the pretraining size, as the reference does.
    """
    kwargs = {"num_classes": 0, "drop_path_rate": drop_path}
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = models.create_model(model_name, **kwargs)
    if not has_pyramid(model):  # before loading anything
        DenseBackbone(model)
    if checkpoint:
        report = load_pretrained(model, checkpoint)
        log(f"backbone {model_name}: {report.summary()}")
    # classification-only modules take no part in forward_pyramid: no unused parameters under DDP
    # (forward_pyramid returns block outputs before any final norm)
    for attr in ("head", "fc_norm", "head_drop", "norm"):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
    return DenseBackbone(model)
