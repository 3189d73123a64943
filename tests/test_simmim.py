"""SimMIM baselines (Swin, PVT): contract, loss on masked units only, reference sizes and keys,
a CPU pretraining run that finetunes; MAE ViT with random sampling."""
import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
import models
from models.loss import patchify, unit_stats, unpatchify
from models.masking import random_mask
from engine.checkpoint import safe_load

from grad_rules import silent_parameters

PICOS = ["simmim_swin_pico_128", "simmim_pvt_pico_128"]
SIZES = {"swin": ("tiny", "small", "base", "large"), "pvt": ("tiny", "small", "medium", "large")}


def _masks(n, t, seed=0):
    return random_mask(n, t * t, 0.75, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", PICOS)
def test_forward_backward_and_contract(name):
    torch.manual_seed(0)
    model = models.create_model(name)
    assert (model.token_size, model.stride, model.mask_kind, model.default_mask_ratio) == (8, 16, "random", 0.75)
    assert model.vis_mask_ratio == 0.0 and model.supports_secondary_mask is False and model.norm_pix_loss is False
    imgs = torch.randn(2, 3, 128, 128)
    mask = _masks(2, 8)
    loss, pred, out_mask = model(imgs, mask)
    assert pred.shape == (2, 64, 16 * 16 * 3) and out_mask is mask and torch.isfinite(loss)
    loss.backward()
    # the posmlp's last bias has an exactly-zero gradient by construction: exempted (tests/grad_rules.py)
    assert silent_parameters(model) == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == (["pos_embed"] if "pvt" in name else [])


@pytest.mark.parametrize("name", PICOS)
def test_loss_counts_masked_units_only(name):
    model = models.create_model(name).double().eval()
    imgs = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    mask = _masks(2, 8, seed=1)
    with torch.no_grad():
        _, pred, _ = model(imgs, mask)
    unit = torch.zeros(2, 64, dtype=torch.bool)
    vis_unit, masked_unit = (~mask[0]).nonzero()[0, 0], mask[0].nonzero()[0, 0]
    for norm_pix in (False, True):
        model.norm_pix_loss = norm_pix
        base = model.forward_loss(imgs, pred, mask)
        for u, should_change in ((vis_unit, False), (masked_unit, True)):
            sel = unit.clone()
            sel[0, u] = True
            changed = patchify(imgs, 16).clone()
            changed[sel] = torch.randn_like(changed[sel]) * 3 + 1
            other = unpatchify(changed, 16)
            assert torch.equal(patchify(other, 16), changed)
            loss = model.forward_loss(other, pred, mask)
            assert (not torch.isclose(loss, base, rtol=0, atol=1e-12)) == should_change, (norm_pix, u)
    # the plain loss is the mean |pred - pixels| over the masked units
    model.norm_pix_loss = False
    target = patchify(imgs, 16)
    expect = (pred - target).abs().mean(-1)[mask].mean()
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), expect)
    model.norm_pix_loss = True
    mean, std = unit_stats(target)
    expect = (pred - (target - mean) / std).abs().mean(-1)[mask].mean()
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), expect)


@pytest.mark.parametrize("name", PICOS)
def test_masked_pixels_never_reach_the_encoder_and_head_is_local(name):
    model = models.create_model(name).double().eval()
    imgs = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    mask = _masks(2, 8, seed=2)
    pixel_mask = mask.view(2, 1, 8, 1, 8, 1).expand(2, 3, 8, 16, 8, 16).reshape(2, 3, 128, 128)
    with torch.no_grad():
        _, pred, _ = model(imgs, mask)
        _, pred2, _ = model(torch.where(pixel_mask, torch.randn_like(imgs), imgs), mask)
        _, pred3, _ = model(torch.where(pixel_mask, imgs, torch.randn_like(imgs)), mask)
    assert torch.equal(pred, pred2)          # masked units are replaced by the mask token
    assert not torch.allclose(pred, pred3)
    # raster unit order: unit (r, c) is predicted from the last-stage token (r // 2, c // 2) alone
    latent = torch.randn(1, 4, 4, model.num_features, dtype=torch.float64, requires_grad=True)
    out = model.forward_head(latent)
    assert out.shape == (1, 64, 768)
    for r, c in ((0, 0), (3, 6), (7, 1)):
        (g,) = torch.autograd.grad(out[0, r * 8 + c].sum(), latent, retain_graph=True)
        nz = g.abs().sum(-1)[0].nonzero().tolist()
        assert nz == [[r // 2, c // 2]]


def test_reference_parameter_counts():
    with torch.device("meta"):
        swin = models.create_model("simmim_swin_tiny_256")
        pvt = models.create_model("simmim_pvt_small_256")
    assert sum(p.numel() for p in swin.parameters()) == 29_861_514
    assert sum(p.numel() for p in pvt.parameters()) == 22_609_728
    assert sum(p.numel() for p in pvt.parameters() if p.requires_grad) == 22_347_584


@pytest.mark.parametrize("arch", ["swin", "pvt"])
def test_encoder_keys_are_the_classifier_keys(arch):
    extra = {"mask_token", "norm.weight", "norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    head = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    for size in SIZES[arch] + ("pico",):
        res = "128" if size == "pico" else "256"
        with torch.device("meta"):
            pre = models.create_model(f"simmim_{arch}_{size}_{res}").state_dict()
            ft = models.create_model(f"{arch}_{size}_{res}").state_dict()
        assert set(pre) - set(ft) == extra, size
        assert set(ft) - set(pre) == head, size
        assert all(pre[k].shape == ft[k].shape for k in set(pre) & set(ft)), size


def test_geometry_is_the_finetuning_geometry():
    swin = models.create_model("simmim_swin_pico_128")
    assert swin.window_size == models.create_model("swin_pico_128").window_size == 8
    with torch.device("meta"):
        assert models.create_model("simmim_swin_tiny_256").window_size == 16
        assert models.create_model("simmim_pvt_small_256").sr_ratios == (8, 4, 2, 1)
        assert models.create_model("simmim_swin_tiny_256", img_size=512).token_size == 32


def test_invalid_construction_fails_clearly():
    with pytest.raises(ValueError, match="nearest valid sizes: 128, 256"):
        models.create_model("simmim_swin_tiny_256", img_size=224)
    with pytest.raises(ValueError, match="nearest valid sizes"):
        models.create_model("simmim_pvt_pico_128", img_size=100)
    with pytest.raises(ValueError, match="no secondary masking"):
        models.create_model("simmim_swin_pico_128", vis_mask_ratio=0.25)
    model = models.create_model("simmim_pvt_pico_128")
    mask = _masks(1, 8)
    with pytest.raises(ValueError, match="no secondary masking"):
        model(torch.randn(1, 3, 128, 128), mask, mask)
    with pytest.raises(ValueError, match="128-px inputs"):
        model(torch.randn(1, 3, 96, 96), mask)


def _pretrain(tmp_path, model, *flags):
    """One epoch = one step of 4 small random images."""
    data = tmp_path / "data"
    if not data.is_dir():
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):
            Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((96, 96)).save(data / f"{i}.png")
    out = tmp_path / model
    args = main_pretrain.parse_args(["--model", model, "--mask_ratio", "0.75", "--num_workers", "0",
                                     "--data_path", str(data),
                                     "--batch_size", "4", "--epochs", "1", "--device", "cpu", "--print_freq", "1000",
                                     "--output_dir", str(out), "--log_dir", "", *flags])
    assert main_pretrain.main(args) == 0
    return safe_load(out / "checkpoint-0.pth")


def test_simmim_pretrains_on_cpu_and_finetunes(tmp_path):
    ckpt = _pretrain(tmp_path, "simmim_swin_pico_128")
    assert (tmp_path / "simmim_swin_pico_128" / "reconstruction-0.png").is_file()
    classifier = models.create_model("swin_pico_128", num_classes=10)
    res = classifier.load_state_dict(ckpt["model"], strict=False)
    assert sorted(res.missing_keys) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(res.unexpected_keys) == ["decoder_pred.bias", "decoder_pred.weight", "mask_token",
                                           "norm.bias", "norm.weight"]


def test_main_pretrain_rejects_uniform_masks_for_simmim():
    from errors import UsageError
    with pytest.raises(UsageError, match="random masks"):
        main_pretrain.parse_args(["--model", "simmim_pvt_pico_128", "--mask_regular", "--device", "cpu"])


def test_mae_vit_trains_a_step_with_random_masks(tmp_path):
    """MAE's random sampling (no --mask_regular): exactly int(0.75 * 36) = 27 units removed per sample."""
    torch.manual_seed(0)
    model = models.create_model("mae_vit_pico_patch16", norm_pix_loss=True)
    assert model.token_size == 6
    mask = random_mask(4, 36, 0.75, generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [27] * 4
    assert len({tuple(m.nonzero().flatten().tolist()) for m in mask}) > 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss, pred, _ = model(torch.randn(4, 3, 96, 96), mask)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and pred.shape == (4, 36, 768)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="exactly 27 of 36"):
        model(torch.randn(4, 3, 96, 96), random_mask(4, 36, 0.5))
    # and through the program: a random-masked step
    ckpt = _pretrain(tmp_path, "mae_vit_pico_patch16", "--norm_pix_loss")
    assert ckpt["args"].mask_regular is False and ckpt["args"].token_size == 6
