"""Dense backbones: any input size, equality with the unpadded forward, checkpoints, lr groups."""
import pytest
import torch

import models
from dense.backbone import DenseBackbone, build_backbone, dense_param_groups
from util.checkpoint import CheckpointError

PICO = ["swin_pico_128", "pvt_pico_128", "vit_pico_patch16"]


@pytest.mark.parametrize("name", PICO)
def test_odd_sizes_give_padded_pyramids(name):
    torch.manual_seed(0)
    bb = build_backbone(name, drop_path=0.0).eval()
    assert len(bb.out_channels) == len(bb.strides) == 4
    assert bb.strides == sorted(bb.strides) and len(set(bb.strides)) == 4
    for h, w in [(67, 141), (100, 33), (160, 200)]:
        with torch.no_grad():
            feats = bb(torch.randn(1, 3, h, w))
        d = bb.size_divisor
        hp, wp = -(-h // d) * d, -(-w // d) * d
        assert [tuple(f.shape[1:]) for f in feats] == [(c, hp // s, wp // s)
                                                        for c, s in zip(bb.out_channels, bb.strides)]
        assert all(torch.isfinite(f).all() for f in feats)


def test_swin_windows_pad_inside_blocks_and_match_unpadded_at_window_multiples():
    torch.manual_seed(0)
    model = models.create_model("swin_pico_128", num_classes=0).eval()
    # 128 x 192: every stage's map is a window (8) multiple or a whole-map window -> no padding,
    # exactly the plain block run
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        feats = model.forward_pyramid(x)
        ref = model.run_blocks(model.patch_embed(x), models.swin.Positions.grid(32, 48, x.device))
    for f, r in zip(feats, ref):
        assert torch.equal(f, r.permute(0, 3, 1, 2))
    # 150 x 100 -> 160 x 128: stage 1 is 40 x 32, padded to 48 x 32 inside the blocks (stage 2
    # likewise); what lies beyond the image does not matter, since the image is zero-padded first
    x = torch.randn(1, 3, 150, 100)
    with torch.no_grad():
        a = model.forward_pyramid(x)
        b = model.forward_pyramid(torch.nn.functional.pad(x, (0, 28, 0, 10)))
    assert [tuple(t.shape[-2:]) for t in a] == [(40, 32), (20, 16), (10, 8), (5, 4)]
    for t, u in zip(a, b):
        assert torch.equal(t, u)


@pytest.mark.parametrize("name", PICO)
def test_native_size_matches_the_classifier_pyramid(name):
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=0).eval()
    size = getattr(model, "img_size", None) or model.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size)
    bb = DenseBackbone(model)
    with torch.no_grad():
        feats = bb(x)
        if bb.sfp is None:  # Swin / PVT at the built size: the plain stage outputs, bit for bit
            ref = model.forward_pyramid(x)
            for f, r in zip(feats, ref):
                assert torch.equal(f, r)
        else:  # ViT: the simple pyramid's stride-p map is timm's last block output
            last = model.forward_intermediates(x, indices=len(model.blocks), norm=False,
                                               intermediates_only=True)[-1]
            assert torch.equal(feats[2], last)


def test_checkpoint_loads_with_report_and_misfit_names_the_model(tmp_path):
    src = models.create_model("pvt_pico_128", num_classes=7)
    path = tmp_path / "ft.pth"
    torch.save({"model": src.state_dict()}, path)
    lines = []
    bb = build_backbone("pvt_pico_128", str(path), log=lines.append)
    assert "loaded" in lines[0] and str(path) in lines[0]
    assert torch.equal(bb.body.pos_embed, src.pos_embed)
    assert not any(n.startswith(("head.", "fc_norm.")) for n, _ in bb.named_parameters())
    with pytest.raises(CheckpointError, match="looks like pvt_pico_128"):
        build_backbone("swin_pico_128", str(path))


def test_layer_decay_groups_cover_every_parameter_once():
    bb = build_backbone("swin_pico_128")
    model = torch.nn.ModuleDict({"backbone": bb, "neck": torch.nn.Conv2d(3, 4, 1)})
    groups = dense_param_groups(model, bb, weight_decay=0.05, layer_decay=0.5)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    by_name = {n: g for g in groups for n in g["param_names"]}
    n_layers = len(bb.body.blocks) + 1
    assert by_name["backbone.body.patch_embed.proj.weight"]["lr_scale"] == 0.5 ** n_layers
    assert by_name["backbone.body.blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5 ** (n_layers - 1)
    assert by_name["neck.weight"]["lr_scale"] == 1.0 and by_name["neck.weight"]["weight_decay"] == 0.05
    assert by_name["neck.bias"]["weight_decay"] == 0.0
    assert by_name["backbone.body.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    pvt = build_backbone("pvt_pico_128")
    g = {n: g for g in dense_param_groups(pvt, pvt, 0.05) for n in g["param_names"]}
    assert g["body.pos_embed"]["weight_decay"] == 0.0


def test_detection_weight_decay_follows_the_references_custom_keys():
    """mmdet's custom_keys (pos_embed, norm, bias) match the reference's names: the backbone's norms,
    pos_embed and every bias are exempt; the norm weights of adapters, FPN and head are decayed."""
    from dense.detector import build_detector
    bb = build_backbone("pvt_pico_128")
    det = build_detector("gfl", bb, 3, adapter_dim=32, fpn_dim=32)
    g = {n: g["weight_decay"] for g in dense_param_groups(det, bb, 0.05, rule="mmdet") for n in g["param_names"]}
    body = [n for n in g if n.startswith("neck.backbone.body.")]
    assert g["neck.backbone.body.pos_embed"] == 0.0
    assert all(g[n] == 0.0 for n in body if n.endswith(".bias") or "norm" in n)
    assert g["neck.adapters.0.norm.weight"] == g["neck.adapters.0.proj.weight"] == 0.05  # the reference's up1.0
    assert g["neck.adapters.0.norm.bias"] == g["neck.adapters.0.proj.bias"] == 0.0
    norms = [n for n, m in det.named_modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    assert norms and all(g[f"{n}.weight"] == 0.05 and g[f"{n}.bias"] == 0.0 for n in norms)
    assert g["head.scales.0.scale"] == 0.05


def test_a_model_without_pyramid_is_refused_by_name():
    with pytest.raises(ValueError, match="no feature pyramid"):
        DenseBackbone(torch.nn.Linear(2, 2))
