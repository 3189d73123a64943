"""Semantic segmentation: metrics against hand-computed cases, the data layout and pipeline,
sliding-window vs whole-image inference, and main_segmentation training with exact resume."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main_segmentation
from util.pretrained import build_backbone
from engine.optim import dense_param_groups
from segmentation.data import IterationSampler, SegmentationDataset, TrainTransform, find_pairs, load_pair
from segmentation.heads import SegmentationModel
from segmentation.inference import predict, slide_logits, whole_logits, window_starts
from segmentation.metrics import confusion_matrix, segmentation_metrics
from segmentation.toy import NUM_CLASSES, make_toy_ade
from engine.checkpoint import safe_load
from errors import UsageError


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_ade(tmp_path_factory.mktemp("toy_seg"), n_train=6, n_val=3)


# ---------------------------------------------------------------- metrics

def test_perfect_prediction_scores_one():
    label = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    m = segmentation_metrics(confusion_matrix(label.clone(), label, 3))
    assert m["mIoU"] == 1.0 and m["mAcc"] == 1.0 and m["aAcc"] == 1.0 and m["pixels"] == 7


def test_shifted_prediction_gives_the_hand_computed_values():
    # labels: columns 0-1 class 0, columns 2-3 class 1; the prediction is shifted one column right
    label = torch.tensor([[0, 0, 1, 1]] * 4)
    pred = torch.tensor([[0, 0, 0, 1]] * 4)
    m = segmentation_metrics(confusion_matrix(pred, label, 2))
    # class 0: TP 8, FP 4, FN 0 -> IoU 8/12; class 1: TP 4, FN 4 -> IoU 4/8, Acc 1/2
    assert m["per_class"]["0"]["IoU"] == pytest.approx(2 / 3, abs=1e-15)
    assert m["per_class"]["1"]["IoU"] == pytest.approx(1 / 2, abs=1e-15)
    assert m["mIoU"] == pytest.approx(7 / 12, abs=1e-15)
    assert m["mAcc"] == pytest.approx(3 / 4, abs=1e-15) and m["aAcc"] == pytest.approx(12 / 16, abs=1e-15)


def test_absent_and_ignored_classes():
    # class 2 is neither labelled nor predicted (NaN, left out); class 3 is predicted but absent (IoU 0, counted)
    label = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 3, 1, 2]])  # the ignored pixel's prediction counts nowhere
    m = segmentation_metrics(confusion_matrix(pred, label, 4))
    iou = {k: v["IoU"] for k, v in m["per_class"].items()}
    assert iou == {"0": 0.5, "1": 1.0, "2": None, "3": 0.0}
    assert m["mIoU"] == pytest.approx(1.5 / 3) and m["mAcc"] == pytest.approx(0.75)
    json.dumps(m)  # NaN written as null: valid JSON
    # summing per-image matrices equals one matrix over all pixels
    a, b = torch.randint(0, 4, (2, 5, 6)), torch.randint(0, 4, (2, 5, 6))
    assert torch.equal(confusion_matrix(a[0], b[0], 4) + confusion_matrix(a[1], b[1], 4), confusion_matrix(a, b, 4))


# ---------------------------------------------------------------- data

def test_layout_errors_and_unmatched_pairs(tmp_path, toy):
    with pytest.raises(UsageError, match=r"missing annotations/validation/"):
        (tmp_path / "bad" / "images" / "validation").mkdir(parents=True)
        main_segmentation.parse_args(["--data_path", str(tmp_path / "bad"), "--eval", "--device", "cpu",
                                      "--output_dir", str(tmp_path / "o"), "--log_dir", ""])
    root = make_toy_ade(tmp_path / "odd", n_train=1, n_val=3)
    val_img = root / "images" / "validation"
    val_ann = root / "annotations" / "validation"
    (val_ann / "toy_validation_00000.png").unlink()                      # image without annotation
    Image.new("L", (8, 8)).save(val_ann / "orphan.png")                  # annotation without image
    Image.new("L", (10, 10)).save(val_ann / "toy_validation_00001.png")  # sizes differ
    pairs = find_pairs(str(root), "val")
    assert [os.path.basename(p) for p, _ in pairs.samples] == ["toy_validation_00002.jpg"]
    assert len(pairs.skipped) == 3
    text = "\n".join(pairs.skipped)
    assert "toy_validation_00000.jpg: no annotation" in text and "orphan.png: no image" in text
    assert "toy_validation_00001.jpg: image 96x64 but annotation 10x10" in text


def test_reduce_zero_label_and_aligned_deterministic_crops(tmp_path):
    root = tmp_path / "d"
    for kind in ("images", "annotations"):
        (root / kind / "training").mkdir(parents=True)
    label = torch.arange(48 * 40).view(40, 48) % 5  # values 0..4; 0 -> ignored
    Image.fromarray(label.to(torch.uint8).numpy()).save(root / "annotations" / "training" / "a.png")
    img = torch.stack([label * 50, label * 10, torch.zeros_like(label)]).to(torch.uint8)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / "images" / "training" / "a.png")
    pairs = find_pairs(str(root), "train")
    raw, lab = load_pair(*pairs.samples[0], reduce_zero_label=True)
    assert torch.equal(lab, torch.where(label == 0, 255, label - 1))
    # no resize (ratio 1, scale = the image), no photometric: image and labels must stay aligned
    t = TrainTransform(crop=32, scale=(48, 40), ratio_range=(1.0, 1.0), cat_max_ratio=0.75, photometric=False)
    ds = SegmentationDataset(pairs, train=True, transform=t)
    for seed in range(6):
        x, y, ok = ds[(0, seed)]
        assert x.shape == (3, 32, 32) and y.shape == (32, 32) and ok == 1
        red = (x[0] * 0.229 * 255 + 0.485 * 255).round()
        assert torch.equal(torch.where(y == 255, 0, y + 1) * 50, red.long())
        x2, y2, _ = ds[(0, seed)]
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # a small image is padded: labels 255 outside it
    t = TrainTransform(crop=64, scale=(48, 40), ratio_range=(1.0, 1.0), photometric=True)
    x, y, _ = SegmentationDataset(pairs, train=True, transform=t)[(0, 1)]
    assert x.shape == (3, 64, 64) and (y[40:] == 255).all() and (y[:, 48:] == 255).all()
    assert (x[:, 40:] == 0).all()


def test_out_of_range_labels_and_16_bit_images(tmp_path, monkeypatch):
    """A label map with a class beyond --nb_classes is named (a warning and a line of the run's
    skipped-samples.txt) and replaced in training, counted as unreadable in evaluation (it ended runs
    with an IndexError, on CUDA a device-side assert); a 16-bit image is scaled to 8 bits, not clipped
    to white."""
    from imagedata.datasets import SKIP_LOG_ENV, read_skip_list
    monkeypatch.setenv(SKIP_LOG_ENV, str(tmp_path / "skipped.txt"))
    root = make_toy_ade(tmp_path / "t", n_train=3, n_val=2)
    ann = root / "annotations" / "training"
    bad = sorted(ann.iterdir())[0]
    lab = np.array(Image.open(bad))
    lab[:10, :10] = 10  # class 9 after reduce_zero_label; --nb_classes 4
    Image.fromarray(lab).save(bad)
    val_bad = sorted((root / "annotations" / "validation").iterdir())[0]
    Image.fromarray(np.full_like(np.array(Image.open(val_bad)), 7)).save(val_bad)
    t = TrainTransform(crop=32, scale=(96, 64), ratio_range=(1.0, 1.0), photometric=False)
    train = SegmentationDataset(find_pairs(str(root), "train"), train=True, transform=t, num_classes=NUM_CLASSES)
    with pytest.warns(UserWarning) as caught:
        items = [train[(i, 0)] for i in range(3)]
    msg = " ".join(str(w.message) for w in caught)
    assert bad.name in msg and "label values 10..10 outside the 4 classes" in msg
    assert [ok for _, _, ok in items] == [0, 1, 1]
    listed = read_skip_list(tmp_path / "skipped.txt")
    assert len(listed) == 1 and "label values 10..10" in listed[0][1]
    val = SegmentationDataset(find_pairs(str(root), "val"), train=False, num_classes=NUM_CLASSES)
    with pytest.warns(UserWarning, match=val_bad.name):
        assert [val[i][2] for i in range(2)] == [0, 1]
    # 16-bit grey image: the same pixels as its 8-bit twin
    img = sorted((root / "images" / "training").iterdir())[1]
    grey = np.array(Image.open(img).convert("L"))
    Image.fromarray(grey).save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    a16, _ = load_pair(str(tmp_path / "g16.png"), str(sorted(ann.iterdir())[1]), True)
    a8, _ = load_pair(str(tmp_path / "g8.png"), str(sorted(ann.iterdir())[1]), True)
    assert torch.equal(a16, a8) and a16.float().mean() < 250


def test_logits_are_upsampled_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    seg = SegmentationModel(build_backbone("swin_pico_128", drop_path=0.0, img_size=64), 4, 16, 16,
                            aux_channels=8, dropout=0.0).eval()
    x = torch.randn(1, 3, 64, 64)
    labels = torch.randint(0, 4, (1, 64, 64))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = seg(x)
        head = seg.decode_head(seg.features(x))
        loss, parts = seg(x, labels)
    assert head.dtype == torch.bfloat16 and out.dtype == torch.float32
    want = F.interpolate(head.float(), size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(out, want)
    ce = F.cross_entropy(want, labels, reduction="sum") / labels.numel()
    assert torch.equal(parts["loss_decode"], ce)


def test_iteration_sampler_passes_and_resume():
    s = IterationSampler(n=5, world=2, rank=0, seed=3, batch_size=2, total_iters=7, chunk_iters=3)
    chunks = []
    for c in range(3):
        s.set_epoch(c)
        chunks.append(list(s))
    assert [len(c) for c in chunks] == [6, 6, 2]  # the last chunk ends at total_iters
    s.set_epoch(1)
    s.skip = 4
    assert list(s) == chunks[1][4:]
    other = IterationSampler(n=5, world=2, rank=1, seed=3, batch_size=2, total_iters=7, chunk_iters=3)
    mine = {i for i, _ in chunks[0][:2]}  # first pass: the ranks hold different items
    assert mine.isdisjoint({i for i, _ in list(other)[:2]})


# ---------------------------------------------------------------- inference

class Pointwise(torch.nn.Module):
    """A per-pixel model: every window sees the same logits at a pixel, so slide == whole."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_window_starts_cover_and_stay_inside():
    for size in (20, 32, 33, 50, 100):
        starts = window_starts(size, 32, 21)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            assert 0 <= s and s + min(32, size) <= size
            covered[s:s + 32] = True
        assert covered.all()


def test_slide_equals_whole_where_it_must():
    torch.manual_seed(0)
    model = Pointwise().eval()
    img = torch.randn(1, 3, 50, 70)
    assert torch.allclose(slide_logits(model, img, 4, 32, 21), whole_logits(model, img), atol=1e-5)
    # the real model on an image of the window size: one window, the same logits
    backbone = build_backbone("swin_pico_128", drop_path=0.0, img_size=64)
    seg = SegmentationModel(backbone, 4, 32, 32, aux_channels=16).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(slide_logits(seg, x, 4, 64, 43), whole_logits(seg, x))
    assert torch.equal(predict(seg, x, 4, "slide", 64, 43, out_size=(80, 112)),
                       predict(seg, x, 4, "whole", out_size=(80, 112)))


# ---------------------------------------------------------------- the program

SEG = ["--model", "swin_pico_128", "--input_size", "64", "--img_scale", "128", "64", "--nb_classes",
       str(NUM_CLASSES), "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--log_dir", "",
       "--print_freq", "1", "--channels", "32", "--aux_channels", "16", "--lr", "2e-3", "--warmup_iters", "2",
       "--test_stride", "32", "--no_photometric", "--ratio_range", "1.0", "1.5"]


def run_seg(argv):
    args = main_segmentation.parse_args(argv)
    code = main_segmentation.main(args)
    return code


def _model_state(path):
    return safe_load(path)["model"]


def test_train_loss_falls_metrics_json_and_exact_resume(toy, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    common = SEG + ["--data_path", str(toy), "--iters", "9", "--eval_interval", "3"]
    assert run_seg(common + ["--output_dir", str(full)]) == 0
    records = [json.loads(l) for l in (full / "log.txt").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [3, 6, 9]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    result = json.loads((full / "eval_iter_9.json").read_text())["slide"]
    assert set(result["per_class"]) == {f"class_{i}" for i in range(NUM_CLASSES)} and result["images"] == 3
    assert 0 <= result["mIoU"] <= 1
    # the shared run skeleton: a run record with its end, and the best score in the checkpoint
    run = json.loads((full / "run-001.json").read_text())
    assert run["program"] == "main_segmentation (train)" and run["finished"]["status"] == "completed"
    assert run["finished"]["best_miou"] == safe_load(full / "checkpoint-last.pth")["best_miou"]
    assert "summary: swin_pico_128 UperNet segmentation completed" in capsys.readouterr().out

    # interrupted mid-chunk by a stop signal (at the 5th fetched batch, i.e. inside chunk 1), then resumed
    part = tmp_path / "part"
    fetched = {"n": 0}
    original = SegmentationDataset.__getitem__

    def fetch(self, key):
        if self.train and isinstance(key, tuple):
            fetched["n"] += 1
            if fetched["n"] == 2 * 5:
                os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, key)

    monkeypatch.setattr(SegmentationDataset, "__getitem__", fetch)
    assert run_seg(common + ["--output_dir", str(part)]) == 0
    ckpt = safe_load(part / "checkpoint-last.pth")
    assert (ckpt["epoch"], ckpt["next_step"]) == (1, 2)
    out = capsys.readouterr().out  # the stop line speaks the program's unit: chunk 1 (iterations 3-6), step 2
    assert "stop signal: checkpoint written at iteration 5 of 9;" in out and "epoch" not in out.split("stop signal")[1]
    assert ckpt["best_miou"] == safe_load(part / "checkpoint-0.pth")["best_miou"]  # a stop keeps the best score
    assert json.loads((part / "run-001.json").read_text())["finished"]["status"] == "stopped"
    monkeypatch.setattr(SegmentationDataset, "__getitem__", original)
    assert run_seg(common + ["--output_dir", str(part)]) == 0
    resumed = capsys.readouterr().out  # the resume line speaks iterations too
    assert "continuing at iteration 5 of 9)" in resumed and "epoch" not in resumed.split("resumed from")[1].split("\n")[0]
    a, b = _model_state(full / "checkpoint-last.pth"), _model_state(part / "checkpoint-last.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_seg(common + ["--output_dir", str(part)]) == 0  # a finished run, started again
    assert "holds iteration 9 of 9; nothing to train" in capsys.readouterr().out

    # --eval of the final weights reproduces the training run's last evaluation exactly
    ev = tmp_path / "ev"
    assert run_seg(common + ["--output_dir", str(ev), "--eval", "--resume", str(full / "checkpoint-last.pth"),
                             "--test_mode", "both"]) == 0
    again = json.loads((ev / "eval.json").read_text())
    assert again["slide"]["mIoU"] == result["mIoU"] and again["whole"]["images"] == 3


def test_bad_flags_fail_before_work(toy, tmp_path):
    base = ["--data_path", str(toy), "--device", "cpu", "--output_dir", str(tmp_path), "--log_dir", ""]
    with pytest.raises(UsageError, match="valid backbones"):
        main_segmentation.parse_args(base + ["--model", "nope"])
    with pytest.raises(UsageError, match="--input_size 100"):
        main_segmentation.parse_args(base + ["--model", "swin_pico_128", "--input_size", "100"])
    with pytest.raises(UsageError, match="--test_stride"):
        main_segmentation.parse_args(base + ["--model", "swin_pico_128", "--input_size", "64", "--test_stride", "65"])


def test_pvt_pyramid_shapes_and_layer_decay_groups():
    backbone = build_backbone("pvt_pico_128", drop_path=0.0, img_size=64)
    seg = SegmentationModel(backbone, 5, 16, 16, aux_channels=8).eval()
    feats = seg.features(torch.randn(1, 3, 40, 72))  # the backbone pads; the maps are cut back to the image
    assert [tuple(f.shape[-2:]) for f in feats] == [(10, 18), (5, 9), (3, 5), (2, 3)]
    assert seg(torch.randn(1, 3, 40, 72)).shape == (1, 5, 40, 72)
    groups = dense_param_groups(seg, backbone, 0.05, 0.5, rule="beit")
    n = len(backbone.body.blocks) + 1
    by_name = {name: g for g in groups for name in g["param_names"]}
    assert by_name["backbone.body.patch_embed.proj.weight"]["lr_scale"] == 0.5 ** n
    assert by_name["backbone.body.blocks.0.attn.q.weight"]["lr_scale"] == 0.5 ** (n - 1)
    assert by_name["decode_head.fuse.0.weight"]["lr_scale"] == 1.0
    # the reference's BEiT constructor: every 1-D tensor exempt, pos_embed decayed (its name check never matches)
    assert by_name["backbone.body.pos_embed"]["weight_decay"] == 0.05
    assert by_name["decode_head.fuse.1.weight"]["weight_decay"] == 0.0  # a norm
    assert by_name["backbone.body.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["adapters.0.weight"]["weight_decay"] == 0.05
    assert not any(k.startswith(("backbone.body.head", "backbone.body.fc_norm")) for k in by_name)
