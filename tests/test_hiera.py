"""Hiera MAE: the encoder against timm's Hiera, the decoder and loss against the original's
formulation, key manifests and parameter counts, checkpoints, layer decay, figures, the program."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.hiera import Hiera, undo_windowing

import main_pretrain
import models
from models.contract import PretrainOutput
from models.hiera_mae import MaskedAutoencoderHiera, remap_hiera_checkpoint
from models.masking import random_mask
from engine.optim import param_groups_lrd
from util.pretrained import load_pretrained
from util.visualize import reconstruct
from tiny_data import make_images

PICO = "mae_hiera_pico_128"
# a second small layout: two blocks in the middle stages, heads doubling, 5x5 units at 160 px
SMALL = dict(img_size=160, embed_dim=16, num_heads=2, stages=(1, 2, 2, 1), decoder_embed_dim=32, decoder_depth=2,
             decoder_num_heads=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _timm_twin(model: MaskedAutoencoderHiera) -> Hiera:
    """timm's Hiera with the same layout and the model's encoder weights."""
    n_stages = len(model.stage_ends)
    stages = [model.stage_ends[0] + 1] + [b - a for a, b in zip(model.stage_ends, model.stage_ends[1:])]
    assert len(stages) == n_stages
    ref = Hiera(img_size=(model.img_size, model.img_size), embed_dim=model.blocks[0].dim,
                num_heads=model.blocks[0].attn.heads, stages=tuple(stages), q_pool=model.q_pool, num_classes=0)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all(k.startswith(("decoder_", "mask_token", "multi_scale")) for k in unexpected)
    return ref.eval()


@pytest.mark.parametrize("cfg", [dict(), SMALL], ids=["pico", "small"])
def test_encoder_equals_timm_hiera_with_and_without_masking(cfg):
    torch.manual_seed(0)
    model = (models.create_model(PICO, **cfg) if cfg else models.create_model(PICO)).eval()
    ref = _timm_twin(model)
    t = model.token_size
    x = torch.randn(2, 3, model.img_size, model.img_size)
    mask = random_mask(2, t * t, 0.6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, vis, ours = model.forward_encoder(x, mask, return_intermediates=True)
        x_ref, stages_ref = ref.forward_features(x, mask=~mask, return_intermediates=True)   # timm: True = keep
    assert torch.equal(vis, torch.nonzero(~mask)[:, 1].view(2, -1))
    for a, b in zip(ours["stages"], stages_ref, strict=True):        # (N, K, h, w, C) per stage
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["tokens"], x_ref, rtol=1e-5, atol=1e-5)
    # no masking: a model built to keep every unit against timm's dense forward (spatial stage maps)
    full = MaskedAutoencoderHiera(**{**dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), img_size=128,
                                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2), **cfg},
                                  mask_ratio=0.0).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        _, _, dense = full.forward_encoder(x, torch.zeros(2, t * t, dtype=torch.bool), return_intermediates=True)
        x_ref, maps = ref.forward_features(x, return_intermediates=True)
    for a, b in zip(dense["stages"], maps, strict=True):
        n, _, h, w, c = a.shape
        spatial = a.view(n, t, t, h, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n, t * h, t * w, c)
        torch.testing.assert_close(spatial, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense["tokens"], x_ref, rtol=1e-5, atol=1e-5)


def _original_loss(model: MaskedAutoencoderHiera, ref: Hiera, x, mask):
    """The original hiera_mae.py formulation, written independently: timm's masked forward, fusion
    convs per unit, boolean-index placement, undo_windowing, labels from unfold (channel first)."""
    keep = ~mask
    _, stages = ref.forward_features(x, mask=keep, return_intermediates=True)
    used = stages[: model.q_pool] + stages[-1:]
    fused = 0
    for head, y in zip(model.multi_scale_fusion_heads, used):
        if isinstance(head, torch.nn.Conv2d):
            n, k = y.shape[:2]
            y = head(y.flatten(0, 1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            y = y.reshape(n, k, *y.shape[1:])
        fused = fused + y
    z = model.decoder_embed(model.head.norm(fused))                           # (N, K, f, f, D)
    n, k, f, _, d = z.shape
    dec = model.mask_token.view(1, 1, 1, 1, d).repeat(n, mask.shape[1], f, f, 1)
    dec[keep] = z.reshape(-1, f, f, d)
    t = model.token_size
    tokens = undo_windowing(dec, [t * f, t * f], [f, f]).reshape(n, -1, d) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        tokens = blk(tokens)
    pred = model.decoder_pred(model.decoder_norm(tokens))
    hidden = undo_windowing(mask.view(n, -1, 1, 1, 1).expand(-1, -1, f, f, 1).float(), [t * f, t * f], [f, f])
    hidden = hidden.reshape(n, -1).bool()
    p = model.pred_stride
    label = x.permute(0, 2, 3, 1).unfold(1, p, p).unfold(2, p, p).flatten(1, 2).flatten(2)[hidden]
    label = (label - label.mean(-1, keepdim=True)) / (label.var(-1, keepdim=True) + 1e-6) ** 0.5
    return ((pred[hidden] - label) ** 2).mean(), pred


def test_decoder_and_norm_pix_loss_equal_the_original_formulation():
    torch.manual_seed(0)
    model = models.create_model(PICO, **SMALL).eval()
    ref = _timm_twin(model)
    x = torch.randn(3, 3, 160, 160)
    mask = random_mask(3, 25, 0.6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss, pred, used = model(x, mask)
        want, raw = _original_loss(model, ref, x, mask)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(used, mask) and pred.shape == (3, 25, 32 * 32 * 3)
    # pred is the original's (channel, row, col) patches re-laid as framework units (row, col, channel)
    img = raw.view(3, 10, 10, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(3, 3, 160, 160)
    unit = img.view(3, 3, 5, 32, 5, 32).permute(0, 2, 4, 3, 5, 1).reshape(3, 25, -1)
    torch.testing.assert_close(pred, unit)


PAPER_PARAMS_M = {"tiny": 28, "small": 35, "base": 52, "base_plus": 70, "large": 214}   # Hiera paper, Table 2


@pytest.mark.parametrize("size", list(PAPER_PARAMS_M))
def test_key_manifests_equal_timm_and_parameter_counts_match_the_paper(size):
    with torch.device("meta"):
        pre = models.create_model(f"mae_hiera_{size}_224")
        cls = models.create_model(f"hiera_{size}_224")
        timm_enc = timm.create_model(f"hiera_{size}_224", num_classes=0)
        timm_cls = timm.create_model(f"hiera_{size}_224")
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}                     # noqa: E731
    pretrain_only = ("decoder_", "mask_token", "multi_scale_fusion_heads.")
    enc = {k: v for k, v in shapes(pre.state_dict()).items() if not k.startswith(pretrain_only)}
    assert enc == shapes(timm_enc.state_dict())
    assert shapes(cls.state_dict()) == shapes(timm_cls.state_dict())
    assert round(sum(p.numel() for p in cls.parameters()) / 1e6) == PAPER_PARAMS_M[size]
    # the paper's MAE decoder: 8 blocks of 512-d on the 14x14 final tokens, 16x16x3 pixels per token,
    # fused from stages 1, 2 and 4 (a conv per pooled stage)
    assert len(pre.decoder_blocks) == 8 and pre.decoder_pos_embed.shape == (1, 196, 512)
    assert pre.decoder_pred.out_features == 16 * 16 * 3 and pre.q_pool == 2 and cls.q_pool == 3
    convs = [m for m in pre.multi_scale_fusion_heads if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(4, 4), (2, 2)]
    assert (pre.token_size, pre.stride, pre.num_visible, pre.default_mask_ratio) == (7, 32, int(49 * (1 - 0.6)), 0.6)


def test_pico_trains_every_parameter_and_rejects_bad_input():
    torch.manual_seed(0)
    model = models.create_model(PICO, norm_pix_loss=True)
    assert (model.mask_kind, model.supports_secondary_mask, model.vis_mask_ratio, model.norm_pix_unit) == \
        ("random", False, 0.0, 16)
    mask = random_mask(2, 16, 0.6, generator=torch.Generator().manual_seed(0))
    loss, _, _ = model(torch.randn(2, 3, 128, 128), mask)
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert silent == []
    with pytest.raises(ValueError, match="secondary masking"):
        models.create_model(PICO, vis_mask_ratio=0.25)
    with pytest.raises(ValueError, match="nearest valid sizes: 96, 128"):
        models.create_model(PICO, img_size=112)
    with pytest.raises(ValueError, match=f"remove exactly {16 - model.num_visible} of 16"):
        model(torch.randn(2, 3, 128, 128), random_mask(2, 16, 0.25))


def test_checkpoints_load_into_the_classifier_in_every_layout(tmp_path):
    torch.manual_seed(0)
    pre = models.create_model(PICO)
    sd = pre.state_dict()
    encoder = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token", "multi_scale"))}
    original = {("encoder_norm." + k[len("head.norm."):] if k.startswith("head.norm.") else k): v
                for k, v in encoder.items()}
    assert remap_hiera_checkpoint(original).keys() == encoder.keys()
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ours.pth")                 # our pretraining checkpoint
    save_file({k: v.contiguous() for k, v in encoder.items()}, str(tmp_path / "model.safetensors"))  # timm's .mae
    torch.save({"model_state": original}, tmp_path / "original.pth")            # the Hiera repository's
    for name in ("ours.pth", "model.safetensors", "original.pth"):
        cls = models.create_model("hiera_pico_128", num_classes=5, drop_path_rate=0.1)
        report = load_pretrained(cls, tmp_path / name)
        assert sorted(report.missing) == ["head.fc.bias", "head.fc.weight"] and report.unexpected == []
        assert report.head_reinitialised
        got = cls.state_dict()
        assert all(torch.equal(got[k], v) for k, v in encoder.items()), name
    # the layer ids of the layer-wise lr decay, and drop path reaching the blocks
    assert cls.lrd_num_layers() == 5 and type(cls.blocks[-1].drop_path1).__name__ == "DropPath"
    ids = {n: cls.lrd_layer_id(n) for n, _ in cls.named_parameters()}
    assert ids["pos_embed"] == ids["patch_embed.proj.weight"] == 0 and ids["blocks.0.attn.qkv.weight"] == 1
    assert ids["blocks.3.mlp.fc2.bias"] == 4 and ids["head.norm.weight"] == ids["head.fc.weight"] == 5
    groups = param_groups_lrd(cls, 0.05, 0.65)
    pos = next(g for g in groups if "pos_embed" in g["param_names"])
    assert pos["weight_decay"] == 0.0 and pos["lr_scale"] == pytest.approx(0.65 ** 5)


def test_figure_undoes_norm_pix_per_16px_patch():
    """A model that predicts the normalised targets exactly reconstructs the image exactly when
    figures use each patch's true statistics; the honest default reuses a seen patch's."""
    torch.manual_seed(0)
    model = models.create_model(PICO, norm_pix_loss=True).eval()
    x = torch.randn(2, 3, 128, 128)
    mask = random_mask(2, 16, 0.6, generator=torch.Generator().manual_seed(3))
    from models.loss import patchify, unit_stats, unpatchify
    target = patchify(x, 16)
    mean, std = unit_stats(target)
    perfect = patchify(unpatchify((target - mean) / std, 16), 32)
    model.forward = lambda imgs, m, sm=None: PretrainOutput(torch.zeros(()), perfect, m)
    panels = reconstruct(model, x, mask, denorm="true")
    torch.testing.assert_close(panels["reconstruction"], x, rtol=1e-4, atol=1e-4)
    seen = reconstruct(model, x, mask)["seen"]
    unit_seen = patchify(seen, 32).abs().sum(-1) > 0
    assert torch.equal(unit_seen, ~mask)                              # what the encoder saw, per mask unit


def test_short_pretraining_run_then_finetuning_through_the_programs(tmp_path, capsys):
    data = make_images(tmp_path / "data", n=8, size=128)
    out = tmp_path / "out"
    args = main_pretrain.parse_args([
        "--model", PICO, "--num_workers", "0", "--device", "cpu", "--log_dir", "", "--norm_pix_loss",
        "--batch_size", "4", "--epochs", "3", "--warmup_epochs", "1", "--lr", "2e-3", "--print_freq", "1000",
        "--data_path", str(data), "--output_dir", str(out)])
    assert (args.mask_ratio, args.token_size, args.input_size) == (0.6, 4, 128)
    assert main_pretrain.main(args) == 0
    losses = [json.loads(line)["train_loss"] for line in (out / "log.txt").read_text().splitlines()]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (out / "reconstruction-2.png").is_file()
    # ... and its checkpoint finetunes the timm classifier through main_finetune.py
    import main_finetune
    from tiny_data import make_labelled
    labelled = make_labelled(tmp_path / "labelled", per_class=2)
    ft = main_finetune.parse_args([
        "--model", "hiera_pico_128", "--finetune", str(out / "checkpoint-2.pth"), "--nb_classes", "3",
        "--data_path", str(labelled), "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0",
        "--layer_decay", "0.65", "--drop_path", "0.1", "--num_workers", "0", "--device", "cpu", "--log_dir", "",
        "--print_freq", "1000", "--output_dir", str(tmp_path / "ft")])
    assert ft.input_size == 128 and main_finetune.main(ft) == 0
    assert "head re-initialised" in capsys.readouterr().out
    with pytest.raises(main_pretrain.UsageError, match="no secondary masking"):
        main_pretrain.parse_args(["--model", PICO, "--vis_mask_ratio", "0.25", "--data_path", str(data),
                                  "--output_dir", str(tmp_path / "bad")])
