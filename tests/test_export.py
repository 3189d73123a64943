"""tools/export.py: every export format loads back with outputs equal to the model that wrote it.

Formats: an encoder or a classifier (``model.safetensors`` + ``config.json``, rebuilt by
``models.load_exported``), the same files in timm (``timm.create_model(..., pretrained=True,
pretrained_cfg_overlay=dict(file=...))``, strict), and a whole pretraining model (decoder included)
that ``--load_from`` takes back.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch

import models
from errors import CheckpointError, UsageError
from models.checkpoint_maps import TIMM_EXPORTS, TimmTarget, timm_target
from models.masking import random_mask, uniform_mask
from tools.export import export, main as export_main
from util.pretrained import load_pretraining_weights


def _perturbed(model):
    """``model`` in eval mode with non-trivial norms and biases, so a lost or swapped tensor shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _checkpoint(tmp_path, name: str, **kwargs):
    """A checkpoint of a randomly initialised registered model, and the model (eval mode)."""
    torch.manual_seed(0)
    model = _perturbed(models.create_model(name, **kwargs))
    path = tmp_path / f"{name}.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    return path, model


def _timm_from_export(folder):
    cfg = json.loads((folder / "config.json").read_text())["timm"]
    return timm.create_model(cfg["name"], pretrained=True, num_classes=cfg["num_classes"], **cfg["kwargs"],
                             pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"),
                                                         num_classes=cfg["num_classes"])).eval()


@pytest.mark.parametrize("name,classes", [("vit_base_patch16", 10), ("hiera_tiny_224", 0)])
def test_timm_loads_the_export_strictly_with_equal_features(tmp_path, name, classes):
    """Full-size networks (two builds each: ours and timm's); tools/export.py itself is run on pico
    models below (test_export_tool_round_trip_through_timm)."""
    torch.manual_seed(0)
    ours = _perturbed(models.create_model(name, num_classes=classes))
    target = timm_target(name, ours)
    folder = models.save_exported(ours, name, tmp_path / "out", {"num_classes": classes},
                                  {"timm": {"name": target.name, "kwargs": target.kwargs, "num_classes": classes}})
    theirs = _timm_from_export(folder)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff_features = (ours.forward_features(x) - theirs.forward_features(x)).abs().max().item()
        out = ours(x)
        diff_out = (out - theirs(x)).abs().max().item()
    assert out.shape == (2, classes or ours.num_features)
    assert diff_features <= 1e-5 and diff_out <= 1e-5, (diff_features, diff_out)
    if name.startswith("hiera"):
        _assert_timm_load_is_strict(folder)


def _assert_timm_load_is_strict(folder):
    """With num_classes equal on both sides timm loads strictly: a stray tensor in the file is an error."""
    from safetensors.torch import load_file, save_file
    weights = load_file(str(folder / "model.safetensors"))
    weights["stray.weight"] = torch.zeros(1)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(RuntimeError, match="stray.weight"):
        _timm_from_export(folder)


@pytest.mark.parametrize("name", sorted(TIMM_EXPORTS))
def test_every_timm_export_has_timms_keys_and_shapes(name):
    """Each table entry builds in timm with exactly our parameter names and shapes (meta device, no weights)."""
    with torch.device("meta"):
        ours = models.create_model(name, num_classes=7)
        target = timm_target(name, ours)
        theirs = timm.create_model(target.name, num_classes=7, **target.kwargs)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b


@pytest.mark.parametrize("name", ["swin_pico_128", "pvt_pico_128", "mixmim_pico_cls", "vit_pico_patch16"])
def test_backbone_export_round_trip(tmp_path, name):
    path, ours = _checkpoint(tmp_path, name, num_classes=0)
    folder = export(str(path), name, str(tmp_path / "out"))
    meta = json.loads((folder / "config.json").read_text())
    assert meta["model"] == name and meta["kwargs"] == {"num_classes": 0} and "loaded" in meta["load_report"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no temporaries
    back = models.load_exported(folder)
    size = ours.contract.input_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(ours.forward_pyramid(x), back.forward_pyramid(x)):
            assert torch.equal(a, b)
    assert meta["stage_channels"] == [a.shape[1] for a in back.forward_pyramid(x)]


# Pico stand-ins of table entries: timm's architecture with our pico sizes as keyword overrides.
PICO_TIMM = {
    "vit_pico_patch16": TimmTarget("vit_base_patch16_224", dict(embed_dim=64, depth=2, num_heads=4, img_size=96)),
    "swin_pico_patch4_window6_96": TimmTarget("swin_tiny_patch4_window7_224", dict(
        embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=6, img_size=96)),
}


@pytest.mark.parametrize("name,classes", [("vit_pico_patch16", 3), ("swin_pico_patch4_window6_96", 0)])
def test_export_tool_round_trip_through_timm(tmp_path, monkeypatch, name, classes):
    path, ours = _checkpoint(tmp_path, name, num_classes=classes)
    with pytest.raises(UsageError, match=f"timm has no network computing {name}"):
        export(str(path), name, str(tmp_path / "refused"), nb_classes=classes, timm_layout=True)
    monkeypatch.setitem(TIMM_EXPORTS, name, PICO_TIMM[name])
    folder = export(str(path), name, str(tmp_path / "out"), nb_classes=classes, timm_layout=True)
    meta = json.loads((folder / "config.json").read_text())
    pooled = {"global_pool": "avg", "fc_norm": True} if name.startswith("vit") else {}
    expected = {"name": PICO_TIMM[name].name, "kwargs": {**PICO_TIMM[name].kwargs, **pooled}, "num_classes": classes}
    assert meta["timm"] == json.loads(json.dumps(expected))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (ours(x) - _timm_from_export(folder)(x)).abs().max() <= 1e-5
        assert torch.equal(ours(x), models.load_exported(folder)(x))


def test_classifier_export_keeps_the_head(tmp_path):
    path, ours = _checkpoint(tmp_path, "vit_pico_patch16", num_classes=10)
    back = models.load_exported(export(str(path), "vit_pico_patch16", str(tmp_path / "out"), nb_classes=10))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(ours(x), back(x))
    with pytest.raises(CheckpointError, match="no 5-class head"):
        export(str(path), "vit_pico_patch16", str(tmp_path / "out5"), nb_classes=5)


@pytest.mark.parametrize("name", ["mae_swin_pico_128", "greenmim_swin_pico_patch4_win6_dec64b1"])
def test_full_pretraining_export_round_trip_and_load_from(tmp_path, name):
    path, ours = _checkpoint(tmp_path, name)
    folder = export(str(path), name, str(tmp_path / "out"))
    back = models.load_exported(folder)
    size = ours.contract.input_size
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, size, size, generator=g)
    t = ours.contract.token_size
    mask = (uniform_mask(2, t, generator=g) if ours.contract.mask_kind == "uniform"
            else random_mask(1, t * t, 0.75, generator=g).expand(2, -1))  # GreenMIM: one mask per batch
    with torch.no_grad():
        torch.manual_seed(2)
        a = ours(imgs, mask)
        torch.manual_seed(2)
        b = back(imgs, mask)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.pred, b.pred)
    fresh = models.create_model(name)
    report = load_pretraining_weights(fresh, folder / "model.safetensors")  # --load_from takes the export
    assert report.loaded == len(ours.state_dict())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in ours.state_dict().items())


def test_refusals_are_one_line(tmp_path, capsys):
    path, _ = _checkpoint(tmp_path, "swin_pico_128", num_classes=0)
    with pytest.raises(UsageError, match="timm has no network computing swin_pico_128.*vit_base_patch16"):
        export(str(path), "swin_pico_128", str(tmp_path / "out"), timm_layout=True)
    with pytest.raises(UsageError, match="unknown --model"):
        export(str(path), "swin_nope", str(tmp_path / "out"))
    assert export_main(["--checkpoint", str(path), "--model", "swin_pico_128", "--output", str(tmp_path / "ok")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
