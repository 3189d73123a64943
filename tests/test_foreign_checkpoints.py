"""The original checkpoints of SimMIM, GreenMIM and MixMIM load through ``--finetune`` and ``--load_from``.

The files are synthetic, with the exact key layout their code writes: the manifests below follow
the model definitions of microsoft/SimMIM (``models/simmim.py``, ``models/swin_transformer.py``),
LayneH/GreenMIM (``modeling/base_green_models.py``, ``modeling/green_swin_models.py``) and
Sense-X/MixMIM (``models_mixmim.py``, ``models_mixmim_ft.py``): names, shapes, the persistent
buffers, and the checkpoint's ``{'model': ..., 'args': ...}`` wrapper. The mapping of Microsoft
Swin onto timm's layout is checked against timm's own converter (an independent oracle).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from timm.models.swin_transformer import checkpoint_filter_fn as timm_swin_filter

import models
from errors import CheckpointError
from models import checkpoint_maps
from util.pretrained import load_pretrained, load_pretraining_weights

# the pico configurations of our registered models, in the originals' constructor terms
PICO_SWIN = dict(img_size=96, patch=4, dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), windows=(6, 6, 6, 6))
PICO_MIXMIM = dict(img_size=128, patch=4, dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), windows=(8, 8, 8, 4))


def _g(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _window_index(w: int) -> torch.Tensor:
    """A (w*w, w*w) int64 tensor as Swin's ``relative_position_index`` buffer (values do not matter here)."""
    return torch.zeros(w * w, w * w, dtype=torch.int64)


def ms_swin_encoder(cfg: dict, shift_masks: bool) -> dict[str, torch.Tensor]:
    """Microsoft Swin (SimMIM's / GreenMIM's ``SwinTransformer``, ``ape=False``, ``num_classes=0``).

    Per stage s (dim C*2**s, map R = img/patch/2**s): blocks j with norm1, attn (bias table of the
    clamped window, its index buffer, qkv, proj), norm2, mlp; a shifted block (odd j, R > window)
    saves its ``attn_mask`` (nW, w*w, w*w) when ``shift_masks`` (SimMIM's blocks; GreenMIM's keep none);
    ``downsample`` (norm over 4C, reduction 4C -> 2C, no bias) at the end of every stage but the last."""
    c, grid = cfg["dim"], cfg["img_size"] // cfg["patch"]
    sd = {"patch_embed.proj.weight": _g(c, 3, cfg["patch"], cfg["patch"]), "patch_embed.proj.bias": _g(c),
          "patch_embed.norm.weight": _g(c), "patch_embed.norm.bias": _g(c)}
    n = len(cfg["depths"])
    for s, (depth, heads, window) in enumerate(zip(cfg["depths"], cfg["heads"], cfg["windows"])):
        d, r = c * 2 ** s, grid >> s
        w = min(window, r)
        for j in range(depth):
            p = f"layers.{s}.blocks.{j}."
            if shift_masks and j % 2 == 1 and r > window:
                sd[p + "attn_mask"] = torch.zeros((r // w) ** 2, w * w, w * w)
            sd.update({p + "norm1.weight": _g(d), p + "norm1.bias": _g(d),
                       p + "attn.relative_position_bias_table": _g((2 * w - 1) ** 2, heads),
                       p + "attn.relative_position_index": _window_index(w),
                       p + "attn.qkv.weight": _g(3 * d, d), p + "attn.qkv.bias": _g(3 * d),
                       p + "attn.proj.weight": _g(d, d), p + "attn.proj.bias": _g(d),
                       p + "norm2.weight": _g(d), p + "norm2.bias": _g(d),
                       p + "mlp.fc1.weight": _g(4 * d, d), p + "mlp.fc1.bias": _g(4 * d),
                       p + "mlp.fc2.weight": _g(d, 4 * d), p + "mlp.fc2.bias": _g(d)})
        if s < n - 1:
            sd.update({f"layers.{s}.downsample.reduction.weight": _g(2 * d, 4 * d),
                       f"layers.{s}.downsample.norm.weight": _g(4 * d), f"layers.{s}.downsample.norm.bias": _g(4 * d)})
    last = c * 2 ** (n - 1)
    sd.update({"norm.weight": _g(last), "norm.bias": _g(last)})
    return sd


def mae_decoder(encoder_dim: int, dim: int, depth: int, units: int, stride: int = 32) -> dict[str, torch.Tensor]:
    """The MAE-style decoder of GreenMIM and MixMIM (timm ``Block``s, no layer scale)."""
    sd = {"mask_token": _g(1, 1, dim), "decoder_pos_embed": _g(1, units, dim),
          "decoder_embed.weight": _g(dim, encoder_dim), "decoder_embed.bias": _g(dim)}
    for k in range(depth):
        p = f"decoder_blocks.{k}."
        sd.update({p + "norm1.weight": _g(dim), p + "norm1.bias": _g(dim),
                   p + "attn.qkv.weight": _g(3 * dim, dim), p + "attn.qkv.bias": _g(3 * dim),
                   p + "attn.proj.weight": _g(dim, dim), p + "attn.proj.bias": _g(dim),
                   p + "norm2.weight": _g(dim), p + "norm2.bias": _g(dim),
                   p + "mlp.fc1.weight": _g(4 * dim, dim), p + "mlp.fc1.bias": _g(4 * dim),
                   p + "mlp.fc2.weight": _g(dim, 4 * dim), p + "mlp.fc2.bias": _g(dim)})
    sd.update({"decoder_norm.weight": _g(dim), "decoder_norm.bias": _g(dim),
               "decoder_pred.weight": _g(stride * stride * 3, dim), "decoder_pred.bias": _g(stride * stride * 3)})
    return sd


def _last_dim(cfg: dict) -> int:
    return cfg["dim"] * 2 ** (len(cfg["depths"]) - 1)


def simmim_pretrain(cfg: dict = PICO_SWIN) -> dict[str, torch.Tensor]:
    """``SimMIM(SwinTransformerForSimMIM)``: the encoder under ``encoder.``, its ``mask_token`` (1, 1, C),
    and ``decoder`` = Sequential(Conv2d(C_last, 32*32*3, 1), PixelShuffle(32))."""
    sd = {"encoder." + k: v for k, v in ms_swin_encoder(cfg, shift_masks=True).items()}
    sd["encoder.mask_token"] = _g(1, 1, cfg["dim"])
    sd.update({"decoder.0.weight": _g(32 * 32 * 3, _last_dim(cfg), 1, 1), "decoder.0.bias": _g(32 * 32 * 3)})
    return sd


def ms_swin_classifier(cfg: dict = PICO_SWIN, classes: int = 10) -> dict[str, torch.Tensor]:
    """SimMIM's finetuning ``SwinTransformer`` (GreenMIM finetunes with it too): encoder + ``head``."""
    sd = ms_swin_encoder(cfg, shift_masks=True)
    sd.update({"head.weight": _g(classes, _last_dim(cfg)), "head.bias": _g(classes)})
    return sd


def greenmim_pretrain(cfg: dict = PICO_SWIN, decoder_dim: int = 64) -> dict[str, torch.Tensor]:
    """``MaskedAutoencoder(SwinTransformer)``: ``encoder.`` + Swin without attention masks, a 1-block decoder
    over the (img/32)**2 units."""
    sd = {"encoder." + k: v for k, v in ms_swin_encoder(cfg, shift_masks=False).items()}
    sd.update(mae_decoder(_last_dim(cfg), decoder_dim, 1, (cfg["img_size"] // 32) ** 2))
    return sd


def mixmim_encoder(cfg: dict) -> dict[str, torch.Tensor]:
    """MixMIM's encoder: Microsoft Swin names without shifts (no ``attn_mask``), per-stage windows,
    and the frozen sin-cos ``absolute_pos_embed`` (1, N, C)."""
    sd = ms_swin_encoder(cfg, shift_masks=False)
    grid = cfg["img_size"] // cfg["patch"]
    sd["absolute_pos_embed"] = _g(1, grid * grid, cfg["dim"])
    return sd


def mixmim_pretrain(cfg: dict = PICO_MIXMIM, decoder_dim: int = 64) -> dict[str, torch.Tensor]:
    sd = mixmim_encoder(cfg)
    sd.update(mae_decoder(_last_dim(cfg), decoder_dim, 1, (cfg["img_size"] // 32) ** 2))
    return sd


def mixmim_finetune(cfg: dict = PICO_MIXMIM, classes: int = 10) -> dict[str, torch.Tensor]:
    sd = mixmim_encoder(cfg)
    sd.update({"head.weight": _g(classes, _last_dim(cfg)), "head.bias": _g(classes)})
    return sd


def _save(sd: dict, path: Path) -> Path:
    """As the originals save (MAE's ``save_model``): ``{'model', 'epoch', 'args': Namespace}``."""
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(model="original")}, path)
    return path


HEAD = {"head.fc.weight", "head.fc.bias", "head.weight", "head.bias"}

# format, file builder, the classifier --finetune loads it into
FINETUNE_CASES = [
    ("simmim-swin-pretrain", simmim_pretrain, "swin_pico_patch4_window6_96"),
    ("ms-swin-classifier", ms_swin_classifier, "swin_pico_patch4_window6_96"),
    ("greenmim-swin-pretrain", greenmim_pretrain, "swin_pico_patch4_window6_96"),
    ("mixmim-pretrain", mixmim_pretrain, "mixmim_pico_cls"),
    ("mixmim-finetune", mixmim_finetune, "mixmim_pico_cls"),
]


@pytest.mark.parametrize("fmt,build,classifier", FINETUNE_CASES, ids=[c[0] for c in FINETUNE_CASES])
def test_finetune_loads_original_layouts(tmp_path, fmt, build, classifier):
    torch.manual_seed(0)
    sd = build()
    assert checkpoint_maps.identify(sd).name == fmt
    model = models.create_model(classifier, num_classes=10)
    report = load_pretrained(model, _save(sd, tmp_path / "original.pth"))
    own = model.state_dict()
    has_head = fmt in ("ms-swin-classifier", "mixmim-finetune")
    assert set(report.missing) == (set() if has_head else HEAD & set(own)), report.summary()
    assert report.unexpected == []
    assert not report.resized, report.summary()
    assert "layout" in report.summary().split(";")[0]           # the one-line report names the layout
    # every encoder tensor of the file is in the model, unchanged
    mapped = checkpoint_maps.to_family(sd, model.contract.family)
    for k, v in mapped.items():
        if k in own:
            assert torch.equal(own[k], v), k
    encoder = [k for k in own if k not in HEAD]
    assert all(k in mapped for k in encoder)


def test_microsoft_swin_map_agrees_with_timm_converter():
    """Our Microsoft-Swin -> timm map gives exactly what timm's own converter gives."""
    torch.manual_seed(0)
    sd = ms_swin_classifier()
    model = models.create_model("swin_pico_patch4_window6_96", num_classes=10)
    ours = checkpoint_maps.to_family(sd, "swin-timm")
    theirs = timm_swin_filter(dict(sd), model)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_simmim_window6_pretraining_resizes_into_window7(tmp_path):
    """SimMIM pretrains Swin at 192 px / window 6 and finetunes at 224 / window 7: tables are resized."""
    torch.manual_seed(0)
    cfg = dict(img_size=192, patch=4, dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), windows=(6, 6, 6, 6))
    model = models.create_model("swin_tiny_patch4_window7_224", num_classes=0)
    report = load_pretrained(model, _save(simmim_pretrain(cfg), tmp_path / "simmim_192.pth"))
    assert report.missing == [] and report.unexpected == []
    assert report.resized and "SimMIM" in report.summary()


LOAD_FROM_CASES = [
    ("greenmim-swin-pretrain", greenmim_pretrain, "greenmim_swin_pico_patch4_win6_dec64b1"),
    ("mixmim-pretrain", mixmim_pretrain, "mixmim_pico"),
]


@pytest.mark.parametrize("fmt,build,name", LOAD_FROM_CASES, ids=[c[0] for c in LOAD_FROM_CASES])
def test_load_from_continues_original_pretraining(tmp_path, fmt, build, name):
    torch.manual_seed(0)
    sd = build()
    model = models.create_model(name)
    report = load_pretraining_weights(model, _save(sd, tmp_path / "original.pth"))
    own = model.state_dict()
    mapped = checkpoint_maps.to_family(sd, model.contract.family)
    assert set(mapped) == set(own) and report.loaded == len(own)
    assert all(torch.equal(own[k], mapped[k]) for k in own)
    assert "layout" in report.summary()


def test_layout_the_model_cannot_take_is_named(tmp_path):
    path = _save(simmim_pretrain(), tmp_path / "simmim.pth")
    with pytest.raises(CheckpointError, match=r"SimMIM Swin pretraining.*swin_\*_patch4_window\*_224"):
        load_pretraining_weights(models.create_model("greenmim_swin_pico_patch4_win6_dec64b1"), path)
    with pytest.raises(CheckpointError, match="MixMIM pretraining.*mixmim"):
        load_pretrained(models.create_model("swin_pico_patch4_window6_96"), _save(mixmim_pretrain(),
                                                                                  tmp_path / "mixmim.pth"))


def test_file_fitting_no_layout_lists_the_accepted_ones(tmp_path):
    sd = {k: v for k, v in greenmim_pretrain().items() if not k.startswith("encoder.layers.0.")}
    assert checkpoint_maps.identify(sd) is None
    path = _save(sd, tmp_path / "odd.pth")
    for load, name in ((load_pretrained, "swin_pico_patch4_window6_96"),
                       (load_pretraining_weights, "greenmim_swin_pico_patch4_win6_dec64b1")):
        with pytest.raises(CheckpointError) as e:
            load(models.create_model(name), path)
        msg = str(e.value)
        assert "\n" not in msg
        assert all(f.title in msg for f in checkpoint_maps.FORMATS), msg


def test_our_own_layouts_are_not_taken_for_foreign_ones():
    for name in ("swin_pico_patch4_window6_96", "mixmim_pico_cls", "mixmim_pico", "greenmim_swin_pico_patch4_win6_dec64b1",
                 "swin_pico_128", "vit_pico_patch16", "hiera_pico_128", "simmim_swin_pico_128"):
        with torch.device("meta"):
            sd = models.create_model(name).state_dict()
        assert checkpoint_maps.identify(sd) is None, name
