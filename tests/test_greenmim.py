"""GreenMIM: optimal grouping, group window attention, sparse Swin vs timm, decoder, training."""
import json
from functools import partial
import random

import numpy as np
import pytest
import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

import main_pretrain
import models
from models.greenmim import GreenMIMSwin, group_window_attention, make_grouping
from models.grouping import bin_lower_bound, count_bins_bfd, group_cost, pack_exact, plan_groups
from models.masking import random_mask

from grad_rules import silent_parameters

PICO = "greenmim_swin_pico_patch4_win6_dec64b1"


pytestmark = pytest.mark.usefixtures("one_thread")
# 192 px, window 6: stages of 48/24/12/6 tokens (windows misaligned with the 8-token units of
# stage 1; shifted in stages 1-3, global in stage 4), 6x6 units, 9 visible at 75%.
SMALL = dict(img_size=192, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=6)


# ---------------------------------------------------------------- grouping

def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in _partitions(rest):
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1:]
        yield [[first]] + p


def _brute_force(sizes, slot_cost):
    """Least cost over every partition of the windows (g = the fullest group)."""
    return min(group_cost(len(p), max(sum(b) for b in p), slot_cost) for p in _partitions(list(sizes)))


def _check_packing(plan, sizes):
    placed = sorted(s for n, contents in plan.bins for _ in range(n) for s in contents)
    assert placed == sorted(sizes)
    assert all(sum(contents) <= plan.group_size for _, contents in plan.bins)
    assert sum(n for n, _ in plan.bins) == plan.num_groups


def test_group_plan_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(150):
        sizes = [rng.randint(1, rng.choice([4, 9, 16, 49])) for _ in range(rng.randint(1, 7))]
        slot_cost = rng.choice([0.0, 0.0, 5.0, 40.0])
        plan = plan_groups(np.bincount(sizes), slot_cost=slot_cost)
        _check_packing(plan, sizes)
        assert plan.certified
        assert plan.cost == pytest.approx(_brute_force(sizes, slot_cost))
        assert plan.cost == group_cost(plan.num_groups, plan.group_size, slot_cost)


def test_bin_bounds_and_exact_search_against_brute_force():
    rng = random.Random(1)
    for _ in range(120):
        sizes = [rng.randint(1, 20) for _ in range(rng.randint(1, 7))]
        cap = rng.randint(max(sizes), sum(sizes))
        hist = np.bincount(sizes)
        fewest = min(len(p) for p in _partitions(sizes) if max(sum(b) for b in p) <= cap)
        assert bin_lower_bound(hist, cap) <= fewest <= count_bins_bfd(hist, cap)
        bins, proven = pack_exact(hist, cap)
        assert proven and sum(n for n, _ in bins) == fewest


def test_group_plan_on_batch_sized_histograms_is_tight():
    # Swin-B's geometry (224 px, window 7): the windows of 32 images with their own masks.
    model = GreenMIMSwin(img_size=224, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1), window_size=7,
                         decoder_embed_dim=16, decoder_num_heads=1)
    mask = random_mask(32, 49, 0.75, generator=torch.Generator().manual_seed(0))
    for row in model.grouping_stats(mask):
        assert row["tokens"] == 32 * 12 * (64 >> (2 * row["stage"]))   # int(49 * 0.25) = 12 kept units
        assert row["cost"] <= 1.03 * row["bound"]          # within 3% of a proven lower bound
        if row["stage"] < 2:
            assert row["padding"] < 0.03


# ---------------------------------------------------------------- group window attention

def _dense_reference_attention(blk, x_map, vis):
    """timm's window attention on the dense map, each query restricted to the visible keys of its window.

    x_map (1, R, R, C); vis (R, R) bool. Returns (1, R, R, C).
    """
    ws, sh = blk.window_size[0], blk.shift_size[0]
    r = vis.shape[0]
    v = torch.roll(vis, (-sh, -sh), (0, 1)).view(r // ws, ws, r // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    keys = torch.zeros(v.shape[0], ws * ws, ws * ws, dtype=x_map.dtype).masked_fill(~v[:, None, :], -1e9)
    base = blk.get_attn_mask(device=x_map.device, dtype=x_map.dtype)
    blk.attn_mask = keys if base is None else base + keys
    return blk._attn(x_map)


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("shared", [False, True])
def test_group_window_attention_equals_dense_window_attention(shift, shared):
    torch.manual_seed(0)
    res, ws, dim, n_vis, batch = 12, 6, 8, 50, 2
    blk = SwinTransformerBlock(dim, (res, res), num_heads=2, window_size=ws, shift_size=shift).double().eval()
    torch.nn.init.normal_(blk.attn.relative_position_bias_table, std=1.0)
    x_map = torch.randn(batch, res, res, dim, dtype=torch.float64)
    # arbitrary visible sets (not unit-aligned), raster order inside each sample
    picks = [torch.randperm(res * res)[:n_vis].sort().values for _ in range(batch)]
    if shared:
        picks = [picks[0]] * batch
    rows = torch.stack([p // res for p in picks])
    cols = torch.stack([p % res for p in picks])
    x = torch.stack([x_map[b, rows[b], cols[b]] for b in range(batch)])               # (N, n, C)
    if shared:
        grouping = make_grouping(rows[0], cols[0], torch.zeros_like(rows[0]), res, ws, shift, shared=True)
    else:
        sample = torch.arange(batch).view(batch, 1).expand(-1, n_vis)
        grouping = make_grouping(rows.reshape(-1), cols.reshape(-1), sample.reshape(-1), res, ws, shift)
    assert grouping.plan.num_groups * grouping.plan.group_size < batch * res * res / 2
    out = group_window_attention(blk.attn, x, grouping)
    for b in range(batch):
        vis = torch.zeros(res * res, dtype=torch.bool)
        vis[picks[b]] = True
        ref = _dense_reference_attention(blk, x_map[b:b + 1], vis.view(res, res))[0, rows[b], cols[b]]
        torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-12)


def _timm_restricted_features(timm_model, img, visible_units, token_size):
    """timm Swin on the whole image with every attention restricted to the visible tokens of each window."""
    vis_units = visible_units.view(token_size, token_size)
    for s, stage in enumerate(timm_model.layers):
        u = 8 >> s
        vis = vis_units.repeat_interleave(u, 0).repeat_interleave(u, 1)
        for blk in stage.blocks:
            ws, sh = blk.window_size[0], blk.shift_size[0]
            r = vis.shape[0]
            v = torch.roll(vis, (-sh, -sh), (0, 1)).view(r // ws, ws, r // ws, ws).permute(0, 2, 1, 3)
            v = v.reshape(-1, ws * ws)
            keys = torch.zeros(v.shape[0], ws * ws, ws * ws, dtype=img.dtype).masked_fill(~v[:, None, :], -1e9)
            base = blk.get_attn_mask(device=img.device, dtype=img.dtype)
            blk.attn_mask = keys if base is None else base + keys
    return timm_model.forward_features(img)


def _pair(mask_ratio=0.75, shared=False):
    torch.manual_seed(0)
    ours = GreenMIMSwin(mask_ratio=mask_ratio, shared_mask=shared, decoder_embed_dim=32, decoder_num_heads=2,
                        **SMALL).double().eval()
    for name, p in ours.named_parameters():
        if "relative_position_bias_table" in name:
            torch.nn.init.normal_(p, std=0.5)
    ref = SwinTransformer(num_classes=0, drop_path_rate=0.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                          **SMALL).double().eval()   # GreenMIM's encoder norms: eps 1e-6
    ref.load_state_dict(ours.state_dict(), strict=False)
    return ours, ref


def test_sparse_encoder_with_all_units_visible_equals_timm_swin():
    ours, ref = _pair(mask_ratio=0.0)
    imgs = torch.randn(2, 3, 192, 192, dtype=torch.float64)
    latent, vis = ours.forward_encoder(imgs, torch.zeros(2, 36, dtype=torch.bool))
    assert torch.equal(vis, torch.arange(36).expand(2, -1))
    torch.testing.assert_close(latent, ref.forward_features(imgs).reshape(2, 36, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
def test_sparse_encoder_equals_timm_swin_restricted_to_visible_tokens(shared):
    ours, ref = _pair(shared=shared)
    imgs = torch.randn(3, 3, 192, 192, dtype=torch.float64)
    mask = random_mask(3, 36, 0.75, generator=torch.Generator().manual_seed(1))
    if shared:
        mask = mask[:1].expand(3, -1)
    latent, vis = ours.forward_encoder(imgs, mask)
    assert latent.shape == (3, 9, ours.num_features)
    for b in range(3):
        dense = _timm_restricted_features(ref, imgs[b:b + 1], ~mask[b], 6).reshape(36, -1)
        torch.testing.assert_close(latent[b], dense[vis[b]], rtol=0, atol=1e-10)


# ---------------------------------------------------------------- decoder, forward/backward, contract

def test_decoder_places_each_latent_at_its_own_unit():
    torch.manual_seed(0)
    model = models.create_model(PICO).eval()
    blk = model.decoder_blocks[0]
    for lin in (blk.attn.proj, blk.mlp.fc2):             # the block becomes the identity
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    mask = random_mask(4, 9, 0.75, generator=torch.Generator().manual_seed(2))
    vis = model.visible_units(mask)
    latent = torch.randn(4, 2, model.num_features)          # int(9 * 0.25) = 2 visible units
    with torch.no_grad():
        pred = model.forward_decoder(latent, vis)
        pos = model.decoder_pos_embed[0]
        own = model.decoder_pred(model.decoder_norm(model.decoder_embed(latent) + pos[vis]))
        hidden = model.decoder_pred(model.decoder_norm(model.mask_token[0] + pos))
    for b in range(4):
        for k in range(2):
            torch.testing.assert_close(pred[b, vis[b, k]], own[b, k])
        for u in torch.nonzero(mask[b]).flatten():
            torch.testing.assert_close(pred[b, u], hidden[u])


@pytest.mark.parametrize("shared", [False, True])
def test_pico_forward_backward_reaches_every_parameter(shared):
    torch.manual_seed(0)
    model = models.create_model(PICO, norm_pix_loss=True, shared_mask=shared)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert (model.token_size, model.stride, model.mask_kind, model.default_mask_ratio) == (3, 32, "random", 0.75)
    assert model.vis_mask_ratio == 0.0 and model.supports_secondary_mask is False and model.norm_pix_loss
    imgs = torch.randn(4, 3, 96, 96)
    mask = random_mask(4, 9, 0.75, generator=torch.Generator().manual_seed(0))
    loss, pred, used = model(imgs, mask)
    assert pred.shape == (4, 9, 32 * 32 * 3) and torch.isfinite(loss)
    if shared:
        assert torch.equal(used, mask[:1].expand(4, -1))
    else:
        assert torch.equal(used, mask)
    loss.backward()
    assert silent_parameters(model) == []   # exemptions (none apply to GreenMIM) in tests/grad_rules.py


def test_bad_configurations_fail_clearly():
    with pytest.raises(ValueError, match="secondary masking"):
        models.create_model(PICO, vis_mask_ratio=0.25)
    with pytest.raises(ValueError, match="nearest valid sizes: 96, 192"):
        models.create_model(PICO, img_size=128)
    model = models.create_model(PICO)
    mask = random_mask(2, 9, 0.5)
    with pytest.raises(ValueError, match="hide exactly 7 of 9"):
        model(torch.randn(2, 3, 96, 96), mask)


# ---------------------------------------------------------------- checkpoints into timm, layer decay

def _timm_like(size_cfg, **kw):
    return SwinTransformer(patch_size=4, **size_cfg, **kw)


def test_pretrained_encoder_loads_into_timm_swin_with_only_the_head_missing():
    torch.manual_seed(0)
    pre = models.create_model(PICO)
    sd = pre.state_dict()
    for target in (_timm_like(dict(img_size=96, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                   window_size=6), num_classes=5),
                   models.create_model("swin_pico_patch4_window6_96", num_classes=5)):
        target.eval()
        result = target.load_state_dict(sd, strict=False)
        assert sorted(result.missing_keys) == ["head.fc.bias", "head.fc.weight"]
        assert all(k.startswith(("decoder_", "mask_token")) for k in result.unexpected_keys)
        # the loaded classifier computes the same features when it sees every unit
        full = GreenMIMSwin(mask_ratio=0.0, img_size=96, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                            window_size=6, decoder_embed_dim=64, decoder_num_heads=4)
        full.load_state_dict(sd)
        x = torch.randn(1, 3, 96, 96)
        with torch.no_grad():
            latent, _ = full.forward_encoder(x, torch.zeros(1, 9, dtype=torch.bool))
            torch.testing.assert_close(latent, target.forward_features(x).reshape(1, 9, -1), rtol=1e-4, atol=1e-5)
    # full-size variants (meta tensors: keys and shapes only), including window 14's clamped last stages
    for name, ws, size in [("greenmim_swin_base_patch4_dec512b1", 7, "base"),
                           ("greenmim_swin_large_patch4_win14_dec512b1", 14, "large")]:
        with torch.device("meta"):
            ours = models.create_model(name).state_dict()
            timm_sd = SwinTransformer(window_size=ws, **models.swin_timm.TIMM_SWIN_SIZES[size]).state_dict()
        encoder = {k: v.shape for k, v in ours.items() if not k.startswith(("decoder_", "mask_token"))}
        assert encoder == {k: v.shape for k, v in timm_sd.items() if not k.startswith("head.")}


def test_classifier_layer_ids_for_layer_decay():
    model = models.create_model("swin_pico_patch4_window6_96", num_classes=3)
    assert model.lrd_num_layers() == 9
    expect = {"patch_embed.proj.weight": 0, "layers.0.blocks.0.attn.qkv.weight": 1, "layers.0.blocks.1.norm1.weight": 2,
              "layers.1.downsample.reduction.weight": 2, "layers.1.blocks.0.mlp.fc1.weight": 3,
              "layers.2.downsample.norm.bias": 4, "layers.3.blocks.1.attn.relative_position_bias_table": 8,
              "norm.weight": 9, "head.fc.weight": 9}
    for name, lid in expect.items():
        assert model.lrd_layer_id(name) == lid, name
    ids = [model.lrd_layer_id(n) for n, _ in model.named_parameters()]
    assert ids == sorted(ids) and set(ids) == set(range(10))
    assert {n for n, _ in model.named_parameters() if "relative_position_bias_table" in n} == model.no_weight_decay()


# ---------------------------------------------------------------- pretraining program

def test_short_pretraining_run_loss_falls(tmp_path):
    out = tmp_path / "out"
    args = main_pretrain.parse_args([
        "--model", PICO, "--mask_ratio", "0.75", "--num_workers", "0", "--device", "cpu", "--log_dir", "",
        "--norm_pix_loss", "--batch_size", "4", "--epochs", "4", "--warmup_epochs", "1", "--lr", "2e-3",
        "--print_freq", "1000", "--output_dir", str(out)])
    assert main_pretrain.main(args) == 0
    losses = [json.loads(line)["train_loss"] for line in (out / "log.txt").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert (out / "reconstruction-3.png").is_file()


def test_initialisation_and_norm_eps_follow_the_original():
    """GreenMIM's init pass covers the encoder too: Linear and Conv2d xavier-uniform (conv on its
    (out, in*k*k) view), zero Linear bias; every LayerNorm of encoder and decoder has eps 1e-6."""
    import math
    torch.manual_seed(0)
    model = models.create_model(PICO)
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert any(n.startswith("layers.") for n in norms) and "patch_embed.norm" in norms and "norm" in norms
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight.detach().flatten(1)
            bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
            # xavier-uniform fills [-bound, bound]; timm's trunc-normal(0.02) would stay inside +-0.04
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound, name
            if isinstance(m, torch.nn.Linear):
                assert m.bias is None or not m.bias.any(), name
    tables = [p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    std = torch.cat([t.detach().flatten() for t in tables]).std()
    assert tables and 0.015 < std < 0.025                 # trunc-normal 0.02 (cut at +-2: effectively normal)
