"""Every registered model: forward + backward at a small input size; sizes that cannot work fail clearly."""
import pytest
import torch

import models
from models.masking import draw_masks, secondary_mask

from grad_rules import silent_parameters, watch_single_key

# Parameters the design leaves without gradient in a pretraining step, and why:
#   pos_embed / decoder_pos_embed of MAE models: fixed sin-cos tables (requires_grad=False), not trained.
# Everything else, including vis_mask_token (secondary masking on) and mask_token, must get a finite,
# non-zero gradient, except the parameters whose exact gradient is zero by construction (tests/grad_rules.py
# names each with its reason, e.g. the position MLP's last bias: a constant per softmax row).

# ViT at 64 px: 4x4 units, 4 kept, 1 secondary-masked. (At 32 px the single kept unit would be
# secondary-masked, leaving patch_embed with an exactly-zero gradient by construction.)
SMALL = {"swin": 64, "pvt": 64, "vit": 64}


def _small_kwargs(name: str) -> dict:
    family = next(f for f in SMALL if f"_{f}_" in name or name.startswith(f"{f}_"))
    size = SMALL[family]
    if name.endswith("pico_128") or "pico" in name:
        size = {"swin": 128, "pvt": 128, "vit": 96}[family]
    if "patch14" in name:
        size = 56
    if name.endswith("_32"):  # the 32-px variants (patch 1 / 4-px mask units)
        size = 32
    kwargs = dict(img_size=size)
    if family == "swin" and not name.startswith("mae"):
        kwargs["window_size"] = 8 if size <= 128 else 16
    return kwargs


def _check_grads(model, single_key=frozenset()):
    missing = silent_parameters(model, single_key)
    assert not missing, f"parameters without a finite non-zero gradient: {missing[:8]}"


# Hiera MAE (no secondary masking, 32-px units) is covered by tests/test_hiera.py.
@pytest.mark.parametrize("name", [n for n in models.list_models("mae_*", task="pretrain")
                                  if not n.startswith("mae_hiera_")])
def test_pretraining_model_forward_backward(name):
    torch.manual_seed(0)
    model = models.create_model(name, norm_pix_loss=True, vis_mask_ratio=0.25, **_small_kwargs(name))
    single_key = watch_single_key(model)
    size, stride = model.token_size * model.stride, model.stride
    imgs = torch.randn(2, 3, size, size)
    regular = model.token_size % 2 == 0
    gen = torch.Generator().manual_seed(0)
    mask = draw_masks(2, model.token_size, 0.75, regular, generator=gen)
    sm = secondary_mask(mask, 0.25, generator=gen)   # masks come only from the caller
    loss, pred, out_mask = model(imgs, mask, sm)
    assert pred.shape == (2, model.token_size ** 2, stride * stride * 3)
    assert torch.isfinite(loss) and out_mask is mask
    loss.backward()
    _check_grads(model, single_key)


# timm's Swin classifiers (timm's names, "..._windowW_S") have no forward_pyramid: tests/test_greenmim.py covers them.
# swin_large_256_pm32 differs from swin_large_256 only in the position-MLP width: not run twice.
@pytest.mark.parametrize("name", [n for n in models.list_models(task="classify")
                                  if n.startswith(("swin_", "pvt_", "vit_")) and "_window" not in n
                                  and n != "swin_large_256_pm32"])
def test_classifier_forward_backward_and_pyramid(name):
    torch.manual_seed(0)
    kwargs = _small_kwargs(name)
    # No drop path: with a batch of 2, a block dropped for both samples gets an exactly-zero gradient by
    # chance (seed luck), which says nothing about gradient flow. Drop path itself is timm's.
    model = models.create_model(name, num_classes=5, drop_path_rate=0.0, **kwargs)
    single_key = watch_single_key(model)
    imgs = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    logits = model(imgs)
    assert logits.shape == (2, 5)
    logits.logsumexp(-1).sum().backward()
    _check_grads(model, single_key)
    with torch.no_grad():
        feats = model.forward_pyramid(imgs)
    assert len(feats) == 4 and all(f.dim() == 4 and f.shape[0] == 2 for f in feats)
    if not name.startswith("vit"):
        assert [f.shape[-1] for f in feats] == [kwargs["img_size"] // model.patch_size // 2 ** s for s in range(4)]


def test_tiny_variants_are_under_a_million_parameters():
    for name in models.list_models("*pico*"):
        sm = name.startswith("mae") and not name.startswith("mae_hiera_")
        model = models.create_model(name, **({"vis_mask_ratio": 0.25} if sm else {}))
        assert sum(p.numel() for p in model.parameters()) < 1_000_000, name


def test_secondary_mask_token_is_used_where_units_are_secondary_masked():
    model = models.create_model("mae_swin_pico_128", vis_mask_ratio=0.25).double().eval()
    imgs = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    mask = draw_masks(2, 8, 0.75, True, generator=torch.Generator().manual_seed(1))
    sm = secondary_mask(mask, 0.25, generator=torch.Generator().manual_seed(2))
    _, _, inter = model.forward_encoder(imgs, mask, sm, return_intermediates=True)
    tok = model.patch_embed.norm(model.vis_mask_token)[0, 0]
    x0 = inter["x0"]                                          # (N, 32, 32, C) compact tokens
    is_tok = (x0 == tok).all(-1)                              # (N, 32, 32)
    assert is_tok.sum().item() == 2 * 4 * 16                  # 4 SM units x 16 tokens each, per image
    pos = inter["pos0"]                                       # true coordinates of compact tokens
    units = (pos[..., 0] // 4) * 8 + pos[..., 1] // 4
    assert torch.equal(sm.gather(1, units.flatten(1)).view_as(is_tok), is_tok)


@pytest.mark.parametrize("name,size,match", [
    ("mae_swin_tiny_256", 224, "nearest valid sizes: 128, 256"),
    ("mae_pvt_small_256", 200, "nearest valid sizes: 192, 256"),
    ("swin_tiny_256", 224, "nearest valid sizes: 128, 256"),
])
def test_impossible_input_size_fails_at_construction(name, size, match):
    with pytest.raises(ValueError, match=match):
        models.create_model(name, img_size=size)


def test_models_accept_other_valid_sizes():
    model = models.create_model("mae_swin_tiny_256", img_size=128, vis_mask_ratio=0.25)
    mask = draw_masks(1, 8, 0.75, True, generator=torch.Generator().manual_seed(0))
    loss, pred, _ = model(torch.randn(1, 3, 128, 128), mask)
    assert pred.shape == (1, 64, 768) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="uniform masks"):
        model(torch.randn(1, 3, 128, 128), torch.zeros(1, 64, dtype=torch.bool))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid models: .*mae_swin_tiny_256"):
        models.create_model("mae_swin_tiniest")


@pytest.mark.parametrize("name", ["swin_pico_128", "mae_swin_pico_128"])
def test_gradients_are_bitwise_reproducible_on_cpu(name):
    """Exact resume needs deterministic backward kernels (the position-bias gather in particular)."""
    torch.manual_seed(0)
    pretrain = name.startswith("mae")
    model = models.create_model(name, **({"vis_mask_ratio": 0.25} if pretrain else {"num_classes": 3}))
    imgs = torch.randn(4, 3, 128, 128)
    mask = draw_masks(4, 8, 0.75, True, generator=torch.Generator().manual_seed(0))
    sm = secondary_mask(mask, 0.25, generator=torch.Generator().manual_seed(1))
    grads = []
    for _ in range(3):
        model.zero_grad()
        (model(imgs, mask, sm)[0] if pretrain else model(imgs).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.equal(grads[0][n], g[n]) for g in grads[1:] for n in g)


@pytest.mark.parametrize("name", ["mae_swin_pico_128", "mae_pvt_pico_128", "mae_vit_pico_patch16"])
def test_training_decoder_skips_only_work_the_loss_does_not_read(name):
    """Training mode predicts only the removed units; loss and their predictions equal the full decoder's."""
    torch.manual_seed(0)
    model = models.create_model(name, norm_pix_loss=True, vis_mask_ratio=0.25, decoder_depth=2).double()
    size = model.token_size * model.stride
    imgs = torch.randn(3, 3, size, size, dtype=torch.float64)
    mask = draw_masks(3, model.token_size, 0.75, True, generator=torch.Generator().manual_seed(0))
    sm = secondary_mask(mask, 0.25, generator=torch.Generator().manual_seed(1))
    model.eval()
    full_loss, full_pred, _ = model(imgs, mask, sm)
    model.train()
    loss, pred, _ = model(imgs, mask, sm)
    assert torch.allclose(loss, full_loss, rtol=1e-12, atol=0)
    assert torch.allclose(pred[mask], full_pred[mask], rtol=1e-10, atol=1e-12)
    assert (pred[~mask] == 0).all()
    loss.backward()
    _check_grads(model)
