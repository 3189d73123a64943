"""main_detection.py and detection/: COCO metrics against hand-computed cases, GFL losses and
assignment, bad input, training on a tiny generated COCO set (falling loss, exact resume,
Mask R-CNN box + mask AP)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_detection
from util.pretrained import build_backbone
from detection.coco import STAT_NAMES, CocoDetection, coco_evaluate, collate, load_coco
from detection.detector import build_detector
from detection.gfl import atss_assign, distribution_focal_loss, quality_focal_loss
from tools.make_tiny_coco import make_tiny_coco
from errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("coco"), n_train=4, n_val=2, size=64)


def _write_gt(path: Path, anns: list, categories=({"id": 1, "name": "a"},), size=(300, 300)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [{"id": 1, "file_name": "0.png", "width": size[1], "height": size[0]}]
    for i, a in enumerate(anns, 1):
        a.setdefault("id", i)
        a.setdefault("image_id", 1)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": list(categories)}))
    return path


# ---- metrics -------------------------------------------------------------------------------

def test_perfect_prediction_gives_ap_one_for_boxes_and_masks(tiny_coco):
    coco = load_coco(tiny_coco / "annotations" / "instances_val2017.json")
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in coco.dataset["annotations"]]
    stats = coco_evaluate(coco, results, ["bbox", "segm"])
    for t in ("bbox", "segm"):
        assert list(stats[t]) == list(STAT_NAMES)
        for k in ("AP", "AP50", "AP75", "AR100"):
            assert stats[t][k] == pytest.approx(1.0, abs=1e-12), (t, k)


def test_shifted_box_gives_the_hand_computed_ap(tmp_path):
    # gt 100 x 100; prediction shifted 23 px right: IoU = 77 / 123 = 0.626, a match at the IoU
    # thresholds 0.50, 0.55, 0.60 and none of 0.65 ... 0.95 -> AP = 3 / 10, AP50 = 1, AP75 = 0
    coco = load_coco(_write_gt(tmp_path / "gt.json", [{"category_id": 1, "bbox": [50, 50, 100, 100]}]))
    stats = coco_evaluate(coco, [{"image_id": 1, "category_id": 1, "bbox": [73, 50, 100, 100], "score": 0.9}],
                          ["bbox"])["bbox"]
    assert stats["AP"] == pytest.approx(0.3, abs=1e-12) and stats["AR100"] == pytest.approx(0.3, abs=1e-12)
    assert stats["AP50"] == pytest.approx(1.0, abs=1e-12) and stats["AP75"] == 0.0
    assert stats["APl"] == pytest.approx(0.3, abs=1e-12)
    assert stats["APs"] == stats["APm"] == -1.0  # no small / medium ground truth


# ---- GFL parts -----------------------------------------------------------------------------

def test_dfl_and_qfl_reduce_to_their_definitions():
    pred = torch.randn(3, 17)
    target = torch.tensor([2.0, 5.25, 15.99])
    ce = lambda k: torch.nn.functional.cross_entropy(pred, torch.tensor(k), reduction="none")
    expected = torch.stack([ce([2, 5, 15])[0], 0.75 * ce([2, 5, 15])[1] + 0.25 * ce([3, 6, 16])[1],
                            0.01 * ce([2, 5, 15])[2] + 0.99 * ce([3, 6, 16])[2]])
    assert torch.allclose(distribution_focal_loss(pred, target), expected, atol=1e-5)
    logits = torch.tensor([[0.3, -1.0]])
    # a positive of class 0 whose score target equals its predicted probability: only class 1 costs
    q = quality_focal_loss(logits, torch.tensor([0]), torch.tensor([0.3]).sigmoid())
    p1 = torch.tensor(-1.0).sigmoid()
    assert torch.allclose(q, -torch.log(1 - p1) * p1 ** 2, atol=1e-6)


def test_atss_picks_anchors_inside_the_box_at_its_scale():
    from detection.gfl import anchor_centers
    centers = [anchor_centers((16, 16), 8, torch.device("cpu")), anchor_centers((8, 8), 16, torch.device("cpu"))]
    anchors = torch.cat([torch.cat([c - 32, c + 32], 1) for c in centers[:1]]
                        + [torch.cat([c - 64, c + 64], 1) for c in centers[1:]])
    gt = torch.tensor([[20.0, 20.0, 84.0, 84.0]])  # 64 px: the stride-8 anchors' size
    a = atss_assign(anchors, [256, 64], gt)
    pos = (a == 0).nonzero().squeeze(1)
    assert len(pos) > 0 and (pos < 256).all()
    c = torch.cat(centers)[pos]
    assert ((c > 20) & (c < 84)).all()
    assert (atss_assign(anchors, [256, 64], torch.zeros(0, 4)) == -1).all()


# ---- data and bad input ----------------------------------------------------------------------

def test_missing_layout_is_one_line_naming_what_is_missing(tmp_path):
    (tmp_path / "train2017").mkdir()
    with pytest.raises(UsageError) as e:
        main_detection.parse_args(["--data_path", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                                   "--device", "cpu", "--model", "swin_pico_128"])
    msg = str(e.value)
    assert "\n" not in msg and "annotations/instances_train2017.json" in msg and "val2017/" in msg
    assert "train2017/" not in msg.replace("instances_train2017", "")


def test_invalid_boxes_and_unknown_categories_are_named_skipped_and_counted(tmp_path, tiny_coco):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "train2017").symlink_to(tiny_coco / "train2017")
    gt = json.loads((tiny_coco / "annotations" / "instances_train2017.json").read_text())
    n = len(gt["annotations"])
    gt["annotations"] += [{"id": 9001, "image_id": 1, "category_id": 1, "bbox": [5, 5, -3, 4], "iscrowd": 0},
                          {"id": 9002, "image_id": 1, "category_id": 1, "bbox": [5, 5, float("nan"), 4],
                           "iscrowd": 0},
                          {"id": 9003, "image_id": 2, "category_id": 77, "bbox": [5, 5, 10, 10], "iscrowd": 0}]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(gt))
    ds = CocoDetection(root, "train", train=True, input_size=64)
    assert ds.skipped == {"invalid box": 2, "unknown category": 1}
    assert sum(len(v) for v in ds.anns.values()) == n
    msg = ds.skipped_summary()
    assert "annotation 9001" in msg and "annotation 9003" in msg and "category_id 77" in msg


def test_training_pipeline_keeps_boxes_masks_and_sizes_consistent(tiny_coco):
    ds = CocoDetection(tiny_coco, "train", train=True, input_size=64, ratio_range=(0.5, 2.0), with_masks=True)
    for key in [(0, 1), (1, 2), (2, 3), (3, 4)]:
        img, t, meta = ds[key]
        assert img.shape == (3, 64, 64)
        h, w = meta["size"]
        assert t["masks"].shape[1:] == (h, w) and len(t["masks"]) == len(t["boxes"]) > 0
        for m, b in zip(t["masks"], t["boxes"]):  # every kept box covers its mask (up to resizing)
            ys, xs = m.nonzero(as_tuple=True)
            if len(ys):
                assert xs.min() >= b[0] - 2 and xs.max() <= b[2] + 2 and ys.min() >= b[1] - 2 and ys.max() <= b[3] + 2
        again = ds[key]
        assert torch.equal(again[0], img) and torch.equal(again[1]["boxes"], t["boxes"])  # seeded


# ---- the models and the program ------------------------------------------------------------

def test_gfl_loss_falls_when_fitting_a_batch(tiny_coco):
    torch.manual_seed(0)
    ds = CocoDetection(tiny_coco, "train", train=True, input_size=64)
    bb = build_backbone("swin_pico_128", drop_path=0.0)
    det = build_detector("gfl", bb, 3, adapter_dim=32, fpn_dim=32, neck_norm="none").train()
    imgs, targets, metas = collate([ds[(0, 1)], ds[(1, 2)]], bb.size_divisor)
    sizes = [m["size"] for m in metas]
    opt = torch.optim.AdamW(det.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = sum(det(imgs, sizes, targets).values())
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    det.eval()
    with torch.no_grad():
        out = det(imgs, sizes)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4 and (out[0]["scores"] > 0.05).all()


def _run(tiny_coco, out, *extra):
    args = main_detection.parse_args(
        ["--data_path", str(tiny_coco), "--output_dir", str(out), "--log_dir", "", "--device", "cpu",
         "--model", "swin_pico_128", "--input_size", "64", "--test_size", "64", "64", "--batch_size", "2",
         "--adapter_dim", "32", "--fpn_dim", "32", "--warmup_iters", "1", "--lr", "1e-3", "--num_workers", "0",
         "--print_freq", "100", "--drop_path", "0.1", *map(str, extra)])
    assert main_detection.main(args) == 0


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_program_trains_evaluates_and_resumes_exactly(tiny_coco, tmp_path):
    _run(tiny_coco, tmp_path / "a", "--epochs", "2")
    _run(tiny_coco, tmp_path / "b", "--epochs", "2", "--exit_after_epoch", "0")
    _run(tiny_coco, tmp_path / "b", "--epochs", "2")
    a, b = _weights(tmp_path / "a" / "checkpoint-last.pth"), _weights(tmp_path / "b" / "checkpoint-last.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ev = json.loads((tmp_path / "a" / "eval_epoch1.json").read_text())
    assert list(ev["bbox"]) == list(STAT_NAMES) and all(-1 <= v <= 1 for v in ev["bbox"].values())
    log = [json.loads(l) for l in (tmp_path / "a" / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["train_loss"] > 0 for r in log)
    assert {"train_loss_cls", "train_loss_bbox", "train_loss_dfl", "test_bbox_AP"} <= set(log[0])
    # the shared run skeleton: one record per invocation, each with its end and the best box AP
    first, second = (json.loads((tmp_path / "b" / f"run-00{i}.json").read_text())["finished"] for i in (1, 2))
    assert (first["status"], first["epochs_run"], second["status"], second["epochs_run"]) == \
        ("exited after epoch", 1, "completed", 1)
    assert second["best_ap"] == torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=False)["best_ap"]


def test_mask_rcnn_program_reports_box_and_mask_ap(tiny_coco, tmp_path):
    _run(tiny_coco, tmp_path, "--epochs", "1", "--detector", "mask_rcnn", "--model", "pvt_pico_128")
    ev = json.loads((tmp_path / "eval_epoch0.json").read_text())
    assert list(ev["bbox"]) == list(STAT_NAMES) and list(ev["segm"]) == list(STAT_NAMES)
    log = json.loads((tmp_path / "log.txt").read_text().splitlines()[0])
    assert {"train_loss_mask", "train_loss_classifier", "train_loss_objectness"} <= set(log)
