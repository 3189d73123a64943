"""MixMAE: image isolation in the mixed encoder, unmixing, gradients, a short run, finetune loading."""
import math
import json

import pytest
import torch

import main_pretrain
import models
from engine.optim import param_groups_lrd
from models.loss import patchify
from models.masking import random_mask
from models.mixmim import (MixMIMClassifier, MixMIMPretrain, merge_reconstructions, pair_masks, unit_labels,
                           unmix_tokens)
from engine.checkpoint import safe_load


def pico(dtype=torch.float64, **kwargs) -> MixMIMPretrain:
    torch.manual_seed(0)
    return models.create_model("mixmim_pico", **kwargs).to(dtype)


def batch(n: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 3, 128, 128, generator=g, dtype=dtype)
    mask = random_mask(n, 16, 0.5, generator=g)
    return imgs, mask


def test_contract_attributes_and_bad_construction():
    m = pico(torch.float32, norm_pix_loss=True)
    assert (m.token_size, m.stride, m.mask_kind, m.default_mask_ratio) == (4, 32, "random", 0.5)
    # N source images in, N reconstructed out: throughput is counted per source image
    assert (m.norm_pix_loss, m.vis_mask_ratio, m.supports_secondary_mask, m.images_per_sample) == \
        (True, 0.0, False, 1)
    assert sum(p.numel() for p in m.parameters()) < 1_000_000
    with pytest.raises(ValueError, match="no secondary masking"):
        models.create_model("mixmim_pico", vis_mask_ratio=0.25)
    with pytest.raises(ValueError, match="input size 112 does not fit this model; nearest valid sizes: 64, 128"):
        models.create_model("mixmim_pico", img_size=112)
    with torch.device("meta"):
        with pytest.raises(ValueError, match="nearest valid sizes: 224, 448"):
            models.create_model("mixmim_base", img_size=256)
        base = models.create_model("mixmim_base")
        cls = models.create_model("mixmim_base_cls")
    # MixMIM-B: 114.67M in the pretraining model (mmpretrain's count), 88.34M finetuning
    assert abs(sum(p.numel() for p in base.parameters()) / 1e6 - 114.67) < 0.01
    assert abs(sum(p.numel() for p in cls.parameters()) / 1e6 - 88.34) < 0.01
    assert base.window_sizes == [14, 14, 14, 7] and base.token_size == 7


def test_partner_pixels_do_not_reach_an_images_tokens():
    """float64: changing image 3 changes nothing of image 0's tokens in the mix (0, 3)."""
    model = pico().eval()
    imgs, mask = batch(4)
    m = pair_masks(mask)
    assert torch.equal(m[0], m[3]) and torch.equal(m[1], m[2])
    other = imgs.clone()
    other[3] = torch.randn(3, 128, 128, dtype=torch.float64) * 3
    with torch.no_grad():
        a, b = model.forward_encoder(imgs, m), model.forward_encoder(other, m)
    own0 = ~m[0]
    assert torch.allclose(a[0, own0], b[0, own0], rtol=0, atol=1e-12)      # image 0's tokens: unchanged
    assert (a[0, m[0]] - b[0, m[0]]).abs().amax() > 1e-3                    # image 3's tokens in the mix change
    assert torch.allclose(a[1:3], b[1:3], rtol=0, atol=0)                    # the other pair: untouched
    assert (a[3, own0] - b[3, own0]).abs().amax() > 1e-3
    # negative control: without the same-image attention mask the partner leaks in
    with torch.no_grad():
        def unmasked(x):
            e = model.embed(x)
            lab = unit_labels(m, 4, 8).unsqueeze(-1)
            return model.encode(model.add_pos(torch.where(lab, e.flip(0), e)), None)
        leak = (unmasked(imgs)[0, own0] - unmasked(other)[0, own0]).abs().amax()
    assert leak > 1e-3


def test_unmixing_puts_every_unit_back_at_its_image_and_position():
    """Tokens carry code image*100 + unit; a fake decoder answers each hidden slot with
    the (single) image its visible tokens come from; every unit must come back home."""
    n, length = 5, 16                                  # odd: the middle sample mixes with itself
    m = pair_masks(random_mask(n, length, 0.5, generator=torch.Generator().manual_seed(3)))
    idx = torch.arange(n).view(n, 1)
    src = torch.where(m, n - 1 - idx, idx)             # image each mixed token comes from
    z = (src * 100 + torch.arange(length)).unsqueeze(-1).double()
    seqs = unmix_tokens(z, m, torch.full((1, 1, 1), -1.0, dtype=torch.float64))
    assert seqs.shape == (2 * n, length, 1)
    rec = torch.full_like(seqs, -5.0)
    for j in range(2 * n):
        vis = seqs[j, :, 0] >= 0
        codes = seqs[j, vis, 0].long()
        assert torch.equal(codes % 100, torch.arange(length)[vis])         # tokens stay at their positions
        images = (codes // 100).unique()
        assert len(images) == 1                                             # one image per decoder sequence
        rec[j, ~vis, 0] = images.double() * 100 + torch.arange(length)[~vis].double()
    pred = merge_reconstructions(rec, m)[..., 0]
    assert torch.equal(pred, (idx * 100 + torch.arange(length)).double())  # no -5: every unit was hidden


@pytest.mark.parametrize("name", ["mixmim_pico", "mixmim_pico3_p1_32"])
def test_every_unit_is_predicted_from_its_own_image_without_seeing_itself(name):
    """float64 gradients of the whole model (odd batch): pred[n, u] depends on image n only,
    and never on image n's own unit u. Also for the 3-stage patch-1 variant (4-px units)."""
    torch.manual_seed(0)
    model = models.create_model(name).double().eval()
    size, unit, length = model.img_size, model.stride, model.token_size ** 2
    g0 = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, size, size, generator=g0, dtype=torch.float64).requires_grad_(True)
    mask = random_mask(3, length, 0.5, generator=g0)
    _, pred, m = model(imgs, mask)
    assert pred.shape == (3, length, unit * unit * 3)
    for u in range(length):
        g = torch.autograd.grad(pred[:, u].sum(), imgs, retain_graph=True)[0]
        per_unit = patchify(g.abs(), unit).sum(-1)                          # (N, L)
        assert per_unit[:, u].max() == 0, u
        assert (per_unit.sum(1) > 0).all()
    for i in range(3):
        g = torch.autograd.grad(pred[i].sum(), imgs, retain_graph=True)[0]
        others = [j for j in range(3) if j != i]
        assert g[others].abs().max() == 0 and g[i].abs().max() > 0


def test_forward_backward_every_trainable_parameter_gets_a_gradient():
    model = pico(torch.float32, norm_pix_loss=True)
    imgs, mask = batch(4, seed=2, dtype=torch.float32)
    loss, pred, used = model(imgs, mask)
    assert pred.shape == (4, 16, 32 * 32 * 3) and torch.equal(used, pair_masks(mask))
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    assert {k for k, p in model.named_parameters() if not p.requires_grad} == {"pos_embed", "decoder_pos_embed"}
    for k, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, k
    with pytest.raises(ValueError, match="mask must be"):
        model(imgs, mask[:, :8])


def test_short_pretraining_run_learns_and_its_checkpoint_loads_into_the_classifier(tmp_path):
    out = tmp_path / "out"   # no --data_path: the bundled sample photos
    args = main_pretrain.parse_args(["--model", "mixmim_pico", "--mask_ratio", "0.5", "--norm_pix_loss",
                                     "--num_workers", "0", "--device", "cpu", "--log_dir", "", "--print_freq",
                                     "1000", "--batch_size", "4", "--epochs", "3", "--warmup_epochs", "1",
                                     "--lr", "1e-3", "--output_dir", str(out)])
    assert (args.input_size, args.token_size) == (128, 4)
    assert main_pretrain.main(args) == 0
    ls = [json.loads(line)["train_loss"] for line in (out / "log.txt").read_text().splitlines()]
    assert len(ls) == 3 and ls[-1] < 0.9 * ls[0], ls
    assert (out / "reconstruction-2.png").is_file()

    sd = safe_load(out / "checkpoint-last.pth")["model"]
    cls = models.create_model("mixmim_pico_cls", num_classes=10)
    result = cls.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) == {"head.weight", "head.bias"}
    assert result.unexpected_keys and all(k.startswith("decoder_") or k == "mask_token"
                                          for k in result.unexpected_keys)
    assert torch.equal(cls.layers[2].blocks[1].attn.qkv.weight, sd["layers.2.blocks.1.attn.qkv.weight"])
    with torch.no_grad():
        assert cls(torch.randn(2, 3, 128, 128)).shape == (2, 10)


def test_classifier_layer_decay_follows_the_original_rule():
    with torch.device("meta"):
        cls: MixMIMClassifier = models.create_model("mixmim_base_cls")
    n = cls.lrd_num_layers()
    assert n == 25
    ids = {name: cls.lrd_layer_id(name) for name, _ in cls.named_parameters()}
    assert ids["patch_embed.proj.weight"] == ids["pos_embed"] == 0
    assert ids["layers.0.blocks.0.attn.qkv.weight"] == 1 and ids["layers.0.blocks.1.mlp.fc2.bias"] == 2
    assert ids["layers.0.downsample.reduction.weight"] == ids["layers.1.blocks.0.norm1.weight"] == 3
    assert ids["layers.2.downsample.norm.weight"] == ids["layers.3.blocks.0.attn.proj.weight"] == 23
    assert ids["layers.3.blocks.1.mlp.fc1.weight"] == ids["norm.weight"] == ids["head.weight"] == 24
    assert 0.7 ** (n - ids["head.bias"]) == pytest.approx(0.7)             # the head at 0.7x lr (quirk)
    # the original's finetuning decays the relative-position tables (its no_weight_decay() is empty)
    assert cls.no_weight_decay() == {"pos_embed"}


def test_classifier_decays_relative_position_tables_like_the_original():
    cls = models.create_model("mixmim_pico_cls", num_classes=3)
    groups = param_groups_lrd(cls, 0.05, 0.7)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in cls.named_parameters():
        if not p.requires_grad:
            continue
        expected = 0.0 if p.ndim == 1 else 0.05
        assert decay[id(p)] == expected, name
    assert any(n.endswith("relative_position_bias_table") for n, _ in cls.named_parameters())


@pytest.mark.parametrize("name", ["mixmim_pico", "mixmim_pico_cls"])
def test_initialisation_and_norm_eps_follow_the_original(name):
    """Every Linear xavier-uniform (encoder too) with zero bias, every LayerNorm eps 1e-5 (the decoder
    blocks' too), tables trunc-normal 0.02: the original's init pass, checked on the tensors."""
    torch.manual_seed(0)
    model = models.create_model(name)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    for mod_name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            fan_out, fan_in = m.weight.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w = m.weight.detach()
            # xavier-uniform fills [-bound, bound]; trunc-normal(0.02) would stay inside +-0.04
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound, mod_name
            assert m.bias is None or not m.bias.any(), mod_name
    tables = [p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    std = torch.cat([t.detach().flatten() for t in tables]).std()
    assert tables and 0.015 < std < 0.025                 # trunc-normal 0.02 (cut at +-2: effectively normal)


def test_classifier_forward_backward_and_pyramid():
    torch.manual_seed(0)
    cls = models.create_model("mixmim_pico_cls", num_classes=5, drop_path_rate=0.1)
    imgs = torch.randn(2, 3, 128, 128)
    cls(imgs).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in cls.parameters() if p.requires_grad)
    with torch.no_grad():
        feats = cls.forward_pyramid(imgs)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4)]
    with pytest.raises(ValueError, match="built for 128-px inputs"):
        cls(torch.randn(1, 3, 96, 96))
