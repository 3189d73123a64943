"""Every key map between this package's models and other code bases' checkpoints, in one place.

Imports (``identify``, ``to_family``): the original checkpoints of the methods this framework
reproduces, as their code names the keys, mapped onto the parameter names of the registered
model that takes them. A model's ``checkpoint_filter`` (models.contract) calls ``to_family``
with its own family, so ``--finetune`` and ``--load_from`` read these files like our own.

| layout (``ForeignFormat.name``) | written by | its keys |
|---|---|---|
| ``simmim-swin-pretrain`` | microsoft/SimMIM pretraining (``SimMIM(SwinTransformerForSimMIM)``) | ``encoder.`` + Microsoft Swin, ``encoder.mask_token``, 1x1-conv ``decoder.0.*`` |
| ``greenmim-swin-pretrain`` | LayneH/GreenMIM pretraining (``MaskedAutoencoder(SwinTransformer)``) | ``encoder.`` + Microsoft Swin, MAE decoder ``decoder_*``, ``mask_token`` |
| ``mixmim-pretrain`` | Sense-X/MixMIM pretraining (``MixMIM``) | Microsoft Swin (no shift), ``absolute_pos_embed``, MAE decoder |
| ``mixmim-finetune`` | Sense-X/MixMIM finetuning (``models_mixmim_ft.MixMIM``) | Microsoft Swin (no shift), ``absolute_pos_embed``, ``head.*`` |
| ``ms-swin-classifier`` | SimMIM / GreenMIM finetuning (both use SimMIM's ``SwinTransformer``), GreenMIM's ``extract_backbone`` | Microsoft Swin, ``head.*`` |

"Microsoft Swin" is the layout of the official Swin code: the patch merging at the *end* of
stages 0-2 (``layers.{0,1,2}.downsample.{norm,reduction}``), a bare ``head.*`` Linear, and the
buffers ``relative_position_index`` / ``attn_mask`` saved with the weights. timm (our
``swin_*_patch4_window*`` classifiers and the GreenMIM encoder) puts the merging at the *start* of
stages 1-3 and the classifier at ``head.fc``; the merging weights themselves are the same (both
concatenate the 2x2 neighbours in the order TL, BL, TR, BR). The buffers are rebuilt by the model,
so they are dropped.

Exports (``TIMM_EXPORTS``): the registered classifiers whose computation timm has, with the timm
name and keywords that build the same network; their keys are already timm's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from torch import Tensor

StateDict = dict[str, Tensor]

_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")
_MS_MERGE = re.compile(r"^layers\.(\d+)\.downsample\.")
_TABLE = "layers.0.blocks.0.attn.relative_position_bias_table"


class ForeignCheckpointError(ValueError):
    """A checkpoint in a known foreign layout that the requested model cannot take."""


def _ms_swin_to_timm(sd: Mapping[str, Tensor], prefix: str = "") -> StateDict:
    """Microsoft Swin keys (under ``prefix``) -> timm Swin keys; other keys pass unchanged.

    ``layers.i.downsample.*`` -> ``layers.{i+1}.downsample.*``; ``head.*`` -> ``head.fc.*``;
    the saved buffers are dropped."""
    out: StateDict = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        key = key[len(prefix):]
        if key.rsplit(".", 1)[-1] in _BUFFERS:
            continue
        merge = _MS_MERGE.match(key)
        if merge:
            key = f"layers.{int(merge.group(1)) + 1}.downsample." + key[merge.end():]
        elif key.startswith("head."):
            key = "head.fc." + key[len("head."):]
        out[key] = value
    return out


def _simmim_to_timm(sd: Mapping[str, Tensor]) -> StateDict:
    """SimMIM pretraining: the encoder as timm Swin; its mask token and its 1x1-conv pixel
    predictor under the pretraining-only names every classifier drops (``mask_token``, ``decoder_pred``)."""
    renamed = {("mask_token" if k == "encoder.mask_token" else
                "decoder_pred." + k[len("decoder.0."):] if k.startswith("decoder.0.") else k): v
               for k, v in sd.items()}
    return _ms_swin_to_timm(renamed, "encoder.")


def _mixmim_to_ours(sd: Mapping[str, Tensor]) -> StateDict:
    """Sense-X/MixMIM -> our MixMIM models: the same layout, except the frozen sin-cos table is
    ``pos_embed`` here and the index buffers are rebuilt."""
    return {("pos_embed" if k == "absolute_pos_embed" else k): v for k, v in sd.items()
            if k.rsplit(".", 1)[-1] not in _BUFFERS}


@dataclass(frozen=True)
class ForeignFormat:
    """One foreign checkpoint layout: how to recognise it and which model families take it."""
    name: str
    title: str
    matches: Callable[[frozenset], bool] = field(compare=False)
    into: dict[str, Callable[[Mapping[str, Tensor]], StateDict]] = field(compare=False)
    use: str = ""           # where it goes, for messages and FINETUNE.md


def _has_attn_mask(keys: frozenset) -> bool:
    return any(k.endswith(".attn_mask") for k in keys)


FORMATS: tuple[ForeignFormat, ...] = (
    ForeignFormat(
        "simmim-swin-pretrain", "SimMIM Swin pretraining (microsoft/SimMIM)",
        lambda k: {"encoder.mask_token", "decoder.0.weight", "encoder." + _TABLE} <= k,
        {"swin-timm": _simmim_to_timm},
        "--finetune into swin_*_patch4_window*_224"),
    ForeignFormat(
        "greenmim-swin-pretrain", "GreenMIM Swin pretraining (LayneH/GreenMIM)",
        lambda k: {"encoder." + _TABLE, "decoder_embed.weight", "decoder_pred.weight", "mask_token"} <= k,
        {"swin-timm": lambda sd: _ms_swin_to_timm(sd, "encoder."),
         "greenmim": lambda sd: _ms_swin_to_timm(sd, "encoder.")},
        "--finetune into swin_*_patch4_window*_224; --load_from into greenmim_swin_*"),
    ForeignFormat(
        "mixmim-pretrain", "MixMIM pretraining (Sense-X/MixMIM)",
        lambda k: {"absolute_pos_embed", _TABLE, "decoder_embed.weight", "decoder_pred.weight"} <= k
        and not _has_attn_mask(k),
        {"mixmim": _mixmim_to_ours, "mixmae": _mixmim_to_ours},
        "--finetune into mixmim_*_cls; --load_from into mixmim_base / _large / _huge"),
    ForeignFormat(
        "mixmim-finetune", "MixMIM finetuned classifier (Sense-X/MixMIM)",
        lambda k: {"absolute_pos_embed", _TABLE, "layers.0.downsample.reduction.weight"} <= k
        and "decoder_embed.weight" not in k and not _has_attn_mask(k),
        {"mixmim": _mixmim_to_ours},
        "--finetune into mixmim_*_cls"),
    ForeignFormat(
        "ms-swin-classifier", "Microsoft Swin classifier (SimMIM / GreenMIM finetuning)",
        lambda k: {_TABLE, "layers.0.downsample.reduction.weight"} <= k
        and not k & {"absolute_pos_embed", "pos_embed", "decoder_embed.weight"},
        {"swin-timm": _ms_swin_to_timm},
        "--finetune into swin_*_patch4_window*_224"),
)


def identify(sd: Mapping[str, Tensor]) -> Optional[ForeignFormat]:
    """The foreign layout a state dict is in, or None (ours, timm's, or unknown)."""
    keys = frozenset(sd)
    return next((f for f in FORMATS if f.matches(keys)), None)


def to_family(sd: Mapping[str, Tensor], family: str, model: str = "") -> Mapping[str, Tensor]:
    """``sd`` in the key layout of the models of ``family``: a foreign layout is mapped, anything
    else is returned as it is. A foreign layout that ``family`` cannot take raises
    ForeignCheckpointError naming what does take it."""
    fmt = identify(sd)
    if fmt is None:
        return sd
    if family not in fmt.into:
        raise ForeignCheckpointError(f"the file is a {fmt.title} checkpoint, which {model or family} cannot "
                                     f"take; use it with {fmt.use}")
    return fmt.into[family](sd)


def describe_formats() -> str:
    """One line naming every accepted foreign layout, for error messages."""
    return "; ".join(f"{f.title} ({f.use})" for f in FORMATS)


# ------------------------------------------------------------------ exports to timm

@dataclass(frozen=True)
class TimmTarget:
    """A timm architecture computing exactly what a registered classifier computes."""
    name: str                                  # timm.create_model name
    kwargs: dict = field(default_factory=dict, compare=False)   # beyond num_classes


# Our registered classifier -> timm. Keys are identical (ViT, Hiera and this Swin are timm's
# classes), so the export writes the state dict as it is; ``tests/test_export.py`` proves each
# numerically or by key-and-shape equality (see the test for which).
TIMM_EXPORTS: dict[str, TimmTarget] = {
    "vit_base_patch16": TimmTarget("vit_base_patch16_224"),
    "vit_large_patch16": TimmTarget("vit_large_patch16_224"),
    "vit_huge_patch14": TimmTarget("vit_huge_patch14_224"),
    "hiera_tiny_224": TimmTarget("hiera_tiny_224"),
    "hiera_small_224": TimmTarget("hiera_small_224"),
    "hiera_base_224": TimmTarget("hiera_base_224"),
    "hiera_base_plus_224": TimmTarget("hiera_base_plus_224"),
    "hiera_large_224": TimmTarget("hiera_large_224"),
    "swin_tiny_patch4_window7_224": TimmTarget("swin_tiny_patch4_window7_224"),
    "swin_base_patch4_window7_224": TimmTarget("swin_base_patch4_window7_224"),
    "swin_base_patch4_window14_224": TimmTarget("swin_base_patch4_window7_224", {"window_size": 14}),
    "swin_large_patch4_window14_224": TimmTarget("swin_large_patch4_window7_224", {"window_size": 14}),
}


def timm_target(model_name: str, model) -> TimmTarget:
    """The timm name and keywords that rebuild ``model`` (registered as ``model_name``) exactly;
    ValueError when timm has no such network."""
    if model_name not in TIMM_EXPORTS:
        raise ValueError(f"timm has no network computing {model_name}; timm exports exist for: "
                         f"{', '.join(sorted(TIMM_EXPORTS))}")
    target = TIMM_EXPORTS[model_name]
    kwargs = dict(target.kwargs)
    if model.contract.family == "vit":   # MAE's head: mean of the patch tokens -> fc_norm, or the cls token
        pooled = bool(getattr(model, "global_pool", "token") == "avg")
        kwargs.update(global_pool="avg" if pooled else "token", fc_norm=pooled)
    return TimmTarget(target.name, kwargs)
