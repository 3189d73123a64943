"""Finetuning, loading released checkpoints, safe loading, layer decay, linear probing and k-NN."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import main_finetune
from engine_finetune import LinearProbeHead
import main_pretrain
import models
from programs import ROOT, launch
from errors import CheckpointError
from engine.checkpoint import safe_load
from errors import UsageError
from engine.optim import param_groups_lrd
from util.pretrained import load_pretrained

PY = sys.executable




@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    args = main_pretrain.parse_args(["--model", "mae_swin_pico_128", "--mask_regular", "--vis_mask_ratio", "0.25",
                                     "--norm_pix_loss", "--batch_size", "4", "--epochs", "1", "--num_workers", "0",
                                     "--device", "cpu", "--output_dir", str(out), "--log_dir", "",
                                     "--print_freq", "1000"])
    assert main_pretrain.main(args) == 0
    return out / "checkpoint-0.pth"


FT = ["--model", "swin_pico_128", "--nb_classes", "3", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
      "--log_dir", "", "--print_freq", "1000", "--warmup_epochs", "0"]


def run_ft(argv, defaults=None):
    args = main_finetune.parse_args(argv, defaults=defaults)
    assert main_finetune.main(args) == 0
    return args


def test_finetune_from_pretraining_then_eval_is_deterministic(labelled, pretrained_ckpt, tmp_path, capsys):
    out = tmp_path / "ft"
    run_ft(FT + ["--data_path", str(labelled), "--finetune", str(pretrained_ckpt), "--epochs", "2",
                 "--output_dir", str(out), "--mixup", "0.8", "--cutmix", "1.0", "--blr", "1e-2"])
    text = capsys.readouterr().out
    assert "missing 4 [fc_norm.weight, fc_norm.bias, head.weight, head.bias]" in text
    assert "dropped" in text and "head re-initialised" in text
    for name in ("checkpoint-last.pth", "checkpoint-best.pth", "checkpoint-1.pth", "log.txt"):
        assert (out / name).is_file()
    records = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert {"test_acc1", "test_acc5", "train_loss"} <= set(records[-1])
    metrics = []
    for _ in range(2):
        run_ft(FT + ["--data_path", str(labelled), "--resume", str(out / "checkpoint-last.pth"), "--eval",
                     "--output_dir", str(tmp_path / "eval")])
        metrics.append([l for l in capsys.readouterr().out.splitlines() if l.startswith("evaluation")][0])
    assert metrics[0] == metrics[1]


def test_finetune_resume_is_bit_exact(labelled, pretrained_ckpt, tmp_path):
    common = FT + ["--data_path", str(labelled), "--finetune", str(pretrained_ckpt), "--epochs", "3",
                   "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.1"]
    run_ft(common + ["--output_dir", str(tmp_path / "full")])
    run_ft(common + ["--output_dir", str(tmp_path / "split"), "--exit_after_epoch", "0"])
    assert safe_load(tmp_path / "split" / "checkpoint-last.pth")["epoch"] == 0
    run_ft(common + ["--output_dir", str(tmp_path / "split")])
    x = safe_load(tmp_path / "full" / "checkpoint-last.pth")["model"]
    y = safe_load(tmp_path / "split" / "checkpoint-last.pth")["model"]
    assert all(torch.equal(x[k], y[k]) for k in x)


MANIFEST_MODELS = {
    "pretrain_swin_tiny": "swin_tiny_256", "finetune_swin_tiny": "swin_tiny_256",
    "pretrain_pvt_small": "pvt_small_256", "finetune_pvt_small": "pvt_small_256",
    "pretrain_vit_base": "vit_base_patch16", "finetune_vit_base": "vit_base_patch16",
}


@pytest.mark.parametrize("manifest", sorted(MANIFEST_MODELS))
def test_reference_layout_checkpoints_load_with_expected_keys(reference_dir, manifest, tmp_path):
    spec = json.loads((reference_dir / "ummae_keys" / f"{manifest}.json").read_text())
    spec.pop("note")
    g = torch.Generator().manual_seed(0)
    ckpt = {"model": {k: torch.randn(s, generator=g) for k, s in spec.items()}, "epoch": 199,
            "args": argparse.Namespace(model=manifest, batch_size=128), "optimizer": {}, "scaler": {}}
    path = tmp_path / "ref.pth"
    torch.save(ckpt, path)
    model = models.create_model(MANIFEST_MODELS[manifest], num_classes=1000)
    report = load_pretrained(model, path)
    if manifest.startswith("pretrain"):
        assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        expected_dropped = {k for k in spec if k.startswith(("decoder_", "mask_token", "vis_mask_token", "norm."))}
        assert set(report.dropped) == expected_dropped and report.head_reinitialised
    else:
        assert report.missing == [] and report.dropped == [] and not report.head_reinitialised
    assert report.unexpected == []
    sd = model.state_dict()
    assert torch.equal(sd["patch_embed.proj.weight"], ckpt["model"]["patch_embed.proj.weight"])


def test_mae_official_encoder_only_checkpoint_and_module_prefix(tmp_path):
    enc = models.create_model("vit_pico_patch16", num_classes=0, global_pool=False)
    sd = {f"module.{k}": v for k, v in enc.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "mae.pth")
    model = models.create_model("vit_pico_patch16", num_classes=7)
    report = load_pretrained(model, tmp_path / "mae.pth")
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "norm.weight" in report.dropped


def test_pos_embed_is_resized_for_another_input_size(tmp_path):
    src = models.create_model("vit_pico_patch16", img_size=96, num_classes=3)
    torch.save(src.state_dict(), tmp_path / "bare.pth")
    dst = models.create_model("vit_pico_patch16", img_size=128, num_classes=3)
    report = load_pretrained(dst, tmp_path / "bare.pth")
    assert report.resized == ["pos_embed -> 8x8"] and not report.missing


def test_wrong_architecture_is_named(tmp_path):
    pvt = models.create_model("pvt_pico_128", num_classes=3)
    torch.save({"model": pvt.state_dict()}, tmp_path / "pvt.pth")
    with pytest.raises(CheckpointError, match=r"does not fit Swin .*looks like pvt_pico_128"):
        load_pretrained(models.create_model("swin_pico_128", num_classes=3), tmp_path / "pvt.pth")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, labelled, capsys):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": exploit}, path)
    with pytest.raises(CheckpointError, match="refused to load .*could execute code"):
        safe_load(path)
    assert not marker.exists()
    proc = subprocess.run([PY, str(ROOT / "main_finetune.py"), *FT, "--data_path", str(labelled), "--finetune",
                           str(path), "--output_dir", str(tmp_path / "o")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "refused to load" in proc.stderr and not marker.exists()
    assert proc.stderr.strip().count("\n") == 0


def test_layer_decay_groups_follow_reference_rules():
    cases = {"swin_tiny_256": (13, {"patch_embed.proj.weight": 0, "blocks.0.attn.qkv.weight": 1,
                                    "blocks.2.downsample.proj.weight": 3, "blocks.11.mlp.fc2.weight": 12,
                                    "fc_norm.weight": 13, "head.weight": 13}),
             "pvt_small_256": (17, {"pos_embed": 0, "patch_embed.proj.weight": 0, "blocks.3.downsample.proj.weight": 4,
                                    "blocks.15.attn.sr.weight": 16, "head.bias": 17}),
             "vit_base_patch16": (13, {"cls_token": 0, "pos_embed": 0, "blocks.0.norm1.weight": 1,
                                       "blocks.11.attn.proj.weight": 12, "fc_norm.bias": 13})}
    for name, (num_layers, expected) in cases.items():
        with torch.device("meta"):
            model = models.create_model(name, num_classes=10)
        groups = param_groups_lrd(model, 0.05, 0.85)
        where = {n: g for g in groups for n in g["param_names"]}
        for pname, lid in expected.items():
            g = where[pname]
            assert g["layer_id"] == lid, (name, pname)
            assert g["lr_scale"] == pytest.approx(0.85 ** (num_layers - lid))
        assert where["head.bias"]["weight_decay"] == 0.0 and where["head.weight"]["weight_decay"] == 0.05
        if "pos_embed" in where:
            assert where["pos_embed"]["weight_decay"] == 0.0


def test_linear_probe_and_knn_run(labelled, pretrained_ckpt, tmp_path, capsys):
    from main_linprobe import LINPROBE_DEFAULTS
    out = tmp_path / "lp"
    run_ft(FT + ["--data_path", str(labelled), "--finetune", str(pretrained_ckpt), "--epochs", "2",
                 "--output_dir", str(out), "--batch_size", "6"], defaults=LINPROBE_DEFAULTS)
    ck = safe_load(out / "checkpoint-last.pth")
    assert "head.0.running_mean" in ck["model"] and "head.0.weight" not in ck["model"]
    pre = safe_load(pretrained_ckpt)["model"]
    assert torch.equal(ck["model"]["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])  # frozen
    run_ft(FT + ["--data_path", str(labelled), "--finetune", str(pretrained_ckpt), "--knn", "--knn_k", "5",
                 "--output_dir", str(tmp_path / "knn")])
    res = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert res["count"] == 9 and 0 <= res["acc1"] <= 100


def test_linear_probe_of_a_normalising_timm_head_trains_only_the_probe(labelled):
    """Hiera's timm head is norm -> fc: the probe (BatchNorm without affine + Linear) replaces fc, and
    nothing else trains (the head's LayerNorm stays as loaded)."""
    args = main_finetune.parse_args(["--model", "hiera_pico_p1_32", "--nb_classes", "3", "--linprobe",
                                     "--device", "cpu", "--data_path", str(labelled), "--output_dir", "/tmp/unused"])
    model = main_finetune.build_model(args, torch.device("cpu"))
    assert isinstance(model.head.fc, LinearProbeHead)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["head.fc.1.bias", "head.fc.1.weight"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_knn_vote_is_weighted_by_similarity():
    from engine.knn import knn_classify
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    q = torch.nn.functional.normalize(torch.tensor([[0.2, 1.0]]), dim=1)
    scores = knn_classify(train, labels, q, num_classes=2, k=3, t=0.07)
    assert scores.argmax().item() == 1   # one very close neighbour beats two far ones


@pytest.mark.parametrize("change,message", [
    (["--finetune", "/nonexistent.pth"], "does not exist"),
    (["--nb_classes", "5"], "--nb_classes 5 disagrees with the data: .* has 3 classes"),
    (["--no_val"], "no 'val' split"),
    (["--model", "mae_swin_pico_128"], "that is a pretraining model"),
    (["--mixup", "0.8", "--batch_size", "3"], "even --batch_size"),
])
def test_bad_finetune_input_fails_before_training(labelled, tmp_path, change, message):
    data = labelled
    if change == ["--no_val"]:
        data = tmp_path / "noval"
        (data / "train" / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(data / "train" / "a" / "x.png")
        change = []
    argv = FT + ["--data_path", str(data), "--output_dir", str(tmp_path / "o")] + change
    with pytest.raises(UsageError, match=message):
        main_finetune.parse_args(argv)


def test_truncated_checkpoint_is_a_one_line_error(labelled, pretrained_ckpt, tmp_path):
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(pretrained_ckpt.read_bytes()[:5000])
    proc = subprocess.run([PY, str(ROOT / "main_finetune.py"), *FT, "--data_path", str(labelled), "--finetune",
                           str(bad), "--output_dir", str(tmp_path / "o")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "truncated or corrupt" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_backbone_export_roundtrip_and_pyramid(pretrained_ckpt, tmp_path):
    from tools.export_backbone import export_backbone, load_backbone
    out = export_backbone(str(pretrained_ckpt), "swin_pico_128", str(tmp_path / "bb"))
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["stage_channels"] == [16, 32, 64, 128] and meta["stage_strides"] == [4, 8, 16, 32]
    sd = safe_load(out / "backbone.pth")
    assert not any(k.startswith(("head.", "fc_norm.", "decoder", "mask_token")) for k in sd)
    model = load_backbone(out).eval()
    ref = models.create_model("swin_pico_128", num_classes=0).eval()
    load_pretrained(ref, pretrained_ckpt)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = model.forward_pyramid(x), ref.forward_pyramid(x)
    assert [t.shape[1:] for t in a] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # a plain PyTorch dense head on top (the FINETUNE.md example)
    head = torch.nn.ModuleList([torch.nn.Conv2d(c, 8, 1) for c in meta["stage_channels"]])
    fused = sum(torch.nn.functional.interpolate(h(f), size=a[0].shape[-2:], mode="bilinear") for h, f in zip(head, a))
    assert fused.shape == (1, 8, 32, 32)


def test_finetune_sigterm_mid_epoch_then_resume_is_bit_exact(labelled, pretrained_ckpt, tmp_path):
    """Drop path and Mixup draw from global RNGs: a mid-epoch resume must redraw exactly the same."""
    import signal
    common = FT + ["--data_path", str(labelled), "--finetune", str(pretrained_ckpt), "--epochs", "3",
                   "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.2", "--batch_size", "2",
                   "--print_freq", "1"]
    run_ft(common + ["--output_dir", str(tmp_path / "full")])
    out = tmp_path / "split"
    proc = launch([ROOT / "main_finetune.py", *common, "--output_dir", out], until="Epoch [1] [2/")
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, rest
    ck = safe_load(out / "checkpoint-last.pth")
    assert ck["epoch"] == 1 and ck["next_step"] > 0
    run_ft(common + ["--output_dir", str(out)])
    x = safe_load(tmp_path / "full" / "checkpoint-last.pth")["model"]
    y = safe_load(out / "checkpoint-last.pth")["model"]
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_linear_probe_checkpoint_evaluates_with_its_own_head(labelled, pretrained_ckpt, tmp_path, capsys):
    from main_linprobe import LINPROBE_DEFAULTS
    out = tmp_path / "lp"
    run_ft(FT + ["--data_path", str(labelled), "--finetune", str(pretrained_ckpt), "--epochs", "2",
                 "--output_dir", str(out), "--batch_size", "6", "--blr", "1.0"], defaults=LINPROBE_DEFAULTS)
    best = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch 1:")][0]
    run_ft(FT + ["--data_path", str(labelled), "--finetune", str(out / "checkpoint-last.pth"), "--eval",
                 "--output_dir", str(out)], defaults=LINPROBE_DEFAULTS)
    text = capsys.readouterr().out
    assert "missing 0" in text and "head re-initialised" not in text
    acc = float(best.split("top-1 ")[1].split("%")[0])
    evaluated = float(text.split("evaluation of")[1].split("top-1 ")[1].split("%")[0])
    assert round(evaluated, 2) == acc   # the epoch line prints 2 decimals, the evaluation 3


def test_relative_position_tables_are_resized_for_a_larger_window(tmp_path):
    """GreenMIM / MixMIM checkpoints finetune at 384 px with larger windows (timm-style bias tables)."""
    src = models.create_model("swin_pico_patch4_window6_96", num_classes=3)
    torch.save({"model": src.state_dict()}, tmp_path / "w6.pth")
    dst = models.create_model("swin_pico_patch4_window6_96", num_classes=3, img_size=192, window_size=12)
    report = load_pretrained(dst, tmp_path / "w6.pth")
    assert report.missing == [] and report.resized == ["8 relative position tables -> windows of the model"]
    assert dst(torch.randn(1, 3, 192, 192)).shape == (1, 3)
