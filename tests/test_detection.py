"""main_detection.py and detection/: COCO metrics against hand-computed cases, GFL losses and
assignment, bad input (malformed annotation files, unreadable images), mask pasting and RLE,
training on a tiny generated COCO set (falling loss, exact resume, Mask R-CNN box + mask AP),
evaluation independent of the batch size."""
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main_detection
from util.pretrained import build_backbone
from detection.coco import (STAT_NAMES, CocoDetection, coco_evaluate, collate, load_coco, nearest_index, paste_masks,
                            region_rle)
from detection.detector import build_detector
from detection.gfl import atss_assign, distribution_focal_loss, quality_focal_loss
from tools.make_tiny_coco import make_tiny_coco
from errors import DataError, UsageError

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
    assert len(ds.annotations.labels) == n
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


def _copy_coco(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(root: Path, split: str, fn) -> None:
    path = root / "annotations" / f"instances_{split}2017.json"
    gt = json.loads(path.read_text())
    fn(gt)
    path.write_text(json.dumps(gt))


MALFORMED = {  # what is wrong -> (edit of the val file, words the one-line error must hold)
    "top level a list": (lambda gt: gt.clear() or None, "top level"),
    "duplicate annotation ids": (lambda gt: [a.update(id=1) for a in gt["annotations"]], "annotation id 1 appears"),
    "duplicate image ids": (lambda gt: gt["images"][1].update(id=gt["images"][0]["id"]), "appears more than once"),
    "orphan annotation": (lambda gt: gt["annotations"][0].update(image_id=12345), "refer to no image"),
    "width a string": (lambda gt: gt["images"][0].update(width="64"), "width '64'"),
    "absolute file_name": (lambda gt: gt["images"][0].update(file_name="/etc/hostname"), "leaves"),
    "file_name leaving the folder": (lambda gt: gt["images"][0].update(file_name="../../x.png"), "leaves"),
    "no area to score": (lambda gt: gt["annotations"][0].pop("area"), "'area'"),
    "no iscrowd to score": (lambda gt: gt["annotations"][0].pop("iscrowd"), "'iscrowd'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_annotation_files_are_refused_in_one_line(tmp_path, tiny_coco, case):
    root = _copy_coco(tiny_coco, tmp_path / "coco")
    edit, words = MALFORMED[case]
    if case == "top level a list":
        (root / "annotations" / "instances_val2017.json").write_text("[]")
    else:
        _edit(root, "val", edit)
    with pytest.raises(DataError) as e:
        CocoDetection(root, "val", train=False, test_size=(64, 64))
    msg = str(e.value)
    assert "\n" not in msg and "instances_val2017.json" in msg and words in msg, msg


def test_unreadable_training_images_are_skipped_named_and_counted(tmp_path, tiny_coco, monkeypatch):
    """Missing, corrupt, a FIFO, over PIL's pixel limit, or of another size than the file says: each is
    named once (a warning and a line of the run's skipped-samples.txt) and the next image takes its place; a 16-bit image is scaled, not clipped to white."""
    root = _copy_coco(tiny_coco, tmp_path / "coco")
    img = root / "train2017"
    names = sorted(p.name for p in img.iterdir())
    (img / names[0]).unlink()                                  # missing
    (img / names[1]).write_text("not an image")                # corrupt
    with Image.open(img / names[2]) as im:                     # another size than the annotation file
        im.resize((im.width // 2, im.height // 2)).save(img / names[2])
    with Image.open(img / names[3]) as im:                     # 16-bit grey
        grey = np.asarray(im.convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(img / names[3])
    assert Image.open(img / names[3]).mode.startswith("I")
    from imagedata.datasets import SKIP_LOG_ENV, read_skip_list
    monkeypatch.setenv(SKIP_LOG_ENV, str(tmp_path / "skipped.txt"))
    ds = CocoDetection(root, "train", train=True, input_size=64, ratio_range=(1.0, 1.0))
    assert len(ds) == 4
    with pytest.warns(UserWarning) as caught:
        items = [ds[(i, 0)] for i in range(4)]
    text = " ".join(str(w.message) for w in caught)
    assert all(n in text for n in names[:3]) and names[3] not in text
    assert "FileNotFoundError" in text and "UnidentifiedImageError" in text and "but instances_train2017" in text
    assert [m["replaced"] for _, _, m in items] == [1, 1, 1, 0]
    assert [Path(n).name for n, _ in read_skip_list(tmp_path / "skipped.txt")] == names[:3]  # the run's list
    x = items[3][0][:, :items[3][2]["size"][0], :items[3][2]["size"][1]]
    x8 = ds._item(3, Image.fromarray(grey).convert("RGB"), 0)[0]
    assert torch.allclose(x, x8[:, :x.shape[1], :x.shape[2]], atol=1e-5)  # not white
    # a FIFO (would block forever) and an image over PIL's pixel limit are named and skipped as well
    (img / names[3]).unlink()
    os.mkfifo(img / names[3])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 64-px image is then a decompression bomb
    ds = CocoDetection(root, "train", train=True, input_size=64)  # (each file is named once per data set)
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("blocked on a FIFO")))
    signal.alarm(20)
    try:
        with pytest.warns(UserWarning) as caught, pytest.raises(DataError, match="none of 4 consecutive images"):
            ds[(3, 0)]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    text = " ".join(str(w.message) for w in caught)
    assert "not a regular file" in text and "DecompressionBombError" in text


def _python_objects(root) -> tuple[int, list]:
    """(number of containers, instances of pycocotools' COCO) reachable from ``root``'s state (types,
    modules and functions not followed)."""
    import types

    from pycocotools.coco import COCO
    seen, stack, containers, cocos = set(), [root], 0, []
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)):
            continue
        seen.add(id(o))
        assert not (isinstance(o, np.ndarray) and o.dtype == object), "an array of Python objects"
        containers += isinstance(o, (dict, list, tuple, set))
        if isinstance(o, COCO):
            cocos.append(o)
        stack.extend(gc.get_referents(o))
    return containers, cocos


def test_annotations_are_flat_arrays_whatever_their_number(tmp_path, tiny_coco):
    """A data set holds no pycocotools object and no Python object per image or annotation: the same
    number of containers for 50 times the annotations (a forked DataLoader worker then touches no
    page of them). Masks are kept only for training; the file is parsed in a child process and the
    arrays match an in-process parse. A polygon holding a string is dropped, not fatal."""
    from detection.coco import read_coco, read_coco_apart
    root = _copy_coco(tiny_coco, tmp_path / "coco")

    def grow(gt):
        anns = gt["annotations"]
        gt["annotations"] = [dict(a, id=k * 1000 + a["id"]) for k in range(1, 51) for a in anns]
        gt["annotations"][0]["segmentation"] = [[1, 1, 9, 1, 9, 9], [1, 1, "x", 2, 3, 3]]
        gt["annotations"][1]["segmentation"] = [[1, 1, 9, 1, 9, 9]]
    shutil.copytree(root, tmp_path / "big")
    _edit(tmp_path / "big", "train", grow)
    _edit(tmp_path / "big", "val", grow)
    counts = {}
    for name in ("coco", "big"):
        for split, train in (("train", True), ("val", False)):
            ds = CocoDetection(tmp_path / name, split, train=train, input_size=64, with_masks=True)
            counts[name, split], cocos = _python_objects(ds)
            assert cocos == [], f"{split}: a pycocotools object in the data set"
            assert (ds.annotations.segm is not None) == train
            assert len(ds[(0, 0)][1]["boxes"]) > 0
    big = CocoDetection(tmp_path / "big", "train", train=True, input_size=64, with_masks=True)
    assert len(big.annotations.labels) == 50 * len(CocoDetection(root, "train", train=True).annotations.labels)
    assert counts["coco", "train"] == counts["big", "train"] and counts["coco", "val"] == counts["big", "val"]
    args = (big.ann_file, big.img_dir, True, True, None, 1000)
    here, apart = read_coco(*args)[0], read_coco_apart(*args)[0]
    for field in ("ids", "names", "sizes", "start", "boxes", "labels", "ann_index"):
        assert np.array_equal(getattr(here, field), getattr(apart, field)), field
    assert np.array_equal(here.segm.coords.values, apart.segm.coords.values)
    first = here.ann_index[:2].tolist()  # the two polygon annotations (rows of image 1 come first)
    assert [here.segm.parts[a].tolist() for a in first] == [[6], [6]]  # the bad polygon dropped


def test_an_image_with_too_many_annotations_is_left_out_before_any_allocation(tmp_path, tiny_coco):
    root = _copy_coco(tiny_coco, tmp_path / "coco")
    extra = [{"id": 10_000 + k, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 0, "area": 4}
             for k in range(1001)]
    _edit(root, "train", lambda gt: gt["annotations"].extend(extra))
    ds = CocoDetection(root, "train", train=True, input_size=64)
    assert 1 not in ds.ids.tolist() and len(ds) == 3
    assert "left out 1 images with more than 1000 usable annotations (first: image 1 (000000.png), 100" \
        in ds.skipped_summary()


# ---- masks -----------------------------------------------------------------------------------

def test_region_rle_equals_pycocotools_encode_of_the_whole_mask():
    from pycocotools import mask as mask_utils
    g = np.random.default_rng(0)
    H, W = 23, 17
    for trial in range(60):
        h, w = int(g.integers(1, H + 1)), int(g.integers(1, W + 1))
        y0, x0 = int(g.integers(0, H - h + 1)), int(g.integers(0, W - w + 1))
        region = g.random((h, w)) < [0.0, 0.3, 0.7, 1.0][trial % 4]
        full = np.zeros((H, W), np.uint8)
        full[y0:y0 + h, x0:x0 + w] = region
        want = mask_utils.encode(np.asfortranarray(full))
        assert region_rle(region, y0, x0, (H, W)) == {"size": [H, W], "counts": want["counts"].decode()}


def test_masks_are_pasted_as_mmdet_does_at_the_cost_of_their_boxes():
    """Against a whole-image grid_sample (mmdet's _do_paste_mask formula) for boxes inside, across and
    beyond the image."""
    g = torch.Generator().manual_seed(0)
    H, W = 40, 56
    probs = torch.rand(5, 1, 28, 28, generator=g)
    boxes = torch.tensor([[3.2, 4.7, 20.1, 30.3], [0.0, 0.0, 56.0, 40.0], [-5.0, 30.0, 10.0, 60.0],
                          [50.5, 1.0, 70.0, 12.0], [10.0, 10.0, 10.4, 10.2]])
    ys = torch.arange(H, dtype=torch.float32) + 0.5
    xs = torch.arange(W, dtype=torch.float32) + 0.5
    for (y0, x0, region), p, b in zip(paste_masks(probs, boxes, (H, W)), probs, boxes):
        gx = (xs - b[0]) / (b[2] - b[0]) * 2 - 1
        gy = (ys - b[1]) / (b[3] - b[1]) * 2 - 1
        grid = torch.stack([gx.expand(H, W), gy[:, None].expand(H, W)], -1)[None]
        want = (F.grid_sample(p[None], grid, align_corners=False)[0, 0] >= 0.5).numpy()
        got = np.zeros((H, W), bool)
        got[y0:y0 + region.shape[0], x0:x0 + region.shape[1]] = region
        assert np.array_equal(got, want)


def test_training_masks_cropped_first_equal_resizing_the_whole_mask(tiny_coco):
    ds = CocoDetection(tiny_coco, "train", train=True, input_size=48, ratio_range=(0.5, 2.0), with_masks=True)
    for i in range(len(ds)):
        for seed in range(3):
            x, t, meta = ds[(i, seed)]
            h0, w0 = meta["orig_size"]
            h, w = meta["size"]
            sl = ds.annotations.rows(i)
            full = torch.stack([torch.from_numpy(ds.annotations.segm.mask(int(a), h0, w0, b))
                                for a, b in zip(ds.annotations.ann_index[sl], ds.annotations.boxes[sl])])
            scale = ds.input_size * __import__("random").Random(seed).uniform(*ds.ratio_range) / max(h0, w0)
            nh, nw = max(int(h0 * scale + 0.5), 1), max(int(w0 * scale + 0.5), 1)
            resized = F.interpolate(full[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
            # find the crop offset from the image itself: the kept masks are a window of the resized ones
            found = False
            for oy in range(nh - h + 1):
                for ox in range(nw - w + 1):
                    win = resized[:, oy:oy + h, ox:ox + w]
                    cands = [win, win.flip(-1)]
                    if any(all(any(torch.equal(m, c[k]) for k in range(len(c))) for m in t["masks"]) for c in cands):
                        found = True
                        break
                if found:
                    break
            assert found, (i, seed)
    assert np.array_equal(nearest_index(7, 20, 2, 4), [5, 8, 11, 14])


def test_mask_rcnn_boxes_stay_float32_under_bf16_autocast():
    """torchvision's box coder casts proposals to the deltas' dtype: under bf16 a zero-delta decode moved
    coordinates above 512 px by up to 4 px. Both coders now decode in float32."""
    torch.manual_seed(0)
    det = build_detector("mask_rcnn", build_backbone("swin_pico_128", drop_path=0.0), 3, adapter_dim=32,
                         fpn_dim=32, score_thr=0.0).eval()
    props = torch.tensor([[600.3, 700.7, 1100.1, 760.9], [513.37, 514.71, 1023.3, 767.1], [1.5, 2.25, 90.0, 80.0]])
    for coder in (det.model.rpn.box_coder, det.model.roi_heads.box_coder):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = coder.decode(torch.zeros(3, 4, dtype=torch.bfloat16), [props]).reshape(-1, 4)
        assert out.dtype == torch.float32
        assert torch.allclose(out, props, rtol=0, atol=1e-3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (r,) = det(torch.randn(1, 3, 64, 96), [(64, 96)])
    assert len(r["boxes"]) and r["boxes"].dtype == torch.float32 and r["masks"].shape[1:] == (1, 28, 28)


# ---- the models and the program ------------------------------------------------------------

def test_gfl_predicts_one_small_image_with_one_channel_per_group():
    """At a 64-px test size the coarsest level is 1x1; with one image and a 32-wide head each GroupNorm
    group holds one value, which nn.GroupNorm refuses."""
    torch.manual_seed(0)
    det = build_detector("gfl", build_backbone("swin_pico_128", drop_path=0.0), 3, adapter_dim=32, fpn_dim=32,
                         neck_norm="gn").eval()
    with torch.no_grad():
        (r,) = det(torch.randn(1, 3, 64, 64), [(64, 64)])
    assert r["boxes"].shape[1] == 4

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


def _spy_host_syncs(monkeypatch) -> list:
    """Record Tensor.__float__ / item / tolist calls made inside a compute_loss (each a host sync)."""
    import traceback
    calls = []
    for name in ("__float__", "item", "tolist"):
        def spy(self, *a, _orig=getattr(torch.Tensor, name), _name=name, **k):
            if any(f.name == "compute_loss" for f in traceback.extract_stack(limit=12)):
                calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_program_trains_past_unreadable_images_evaluates_and_resumes_exactly(tiny_coco, tmp_path, monkeypatch,
                                                                           capsys):
    """One training image missing, one validation image corrupt: each epoch trains on, counts the
    skip over all ranks and scores the readable images; a run stopped after epoch 0 and resumed ends
    bit-identical. The logged loss terms are kept on the device (no host sync per step)."""
    root = _copy_coco(tiny_coco, tmp_path / "coco")
    (root / "train2017" / "000001.png").unlink()
    (root / "val2017" / "000000.png").write_text("corrupt")
    calls = _spy_host_syncs(monkeypatch)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        _run(root, tmp_path / "a", "--epochs", "2")
    assert calls == []
    out = capsys.readouterr().out
    assert "warning: 1 unreadable images skipped in epoch 1 (all ranks)" in out
    assert "(1 unreadable images not scored)" in out
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        _run(root, tmp_path / "b", "--epochs", "2", "--exit_after_epoch", "0")
        _run(root, tmp_path / "b", "--epochs", "2")
    a, b = _weights(tmp_path / "a" / "checkpoint-last.pth"), _weights(tmp_path / "b" / "checkpoint-last.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ev = json.loads((tmp_path / "a" / "eval_epoch1.json").read_text())
    assert list(ev["bbox"]) == list(STAT_NAMES) and all(-1 <= v <= 1 for v in ev["bbox"].values())
    assert ev["unreadable_images"] == 1
    log = [json.loads(l) for l in (tmp_path / "a" / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["train_loss"] > 0 for r in log)
    assert {"train_loss_cls", "train_loss_bbox", "train_loss_dfl", "test_bbox_AP"} <= set(log[0])
    assert all(log[0][f"train_loss_{k}"] > 0 for k in ("cls", "bbox", "dfl"))
    assert [r["train_skipped_images"] for r in log] == [1, 1] and log[0]["test_unreadable_images"] == 1
    # the shared run skeleton: one record per invocation, each with its end and the best box AP
    first, second = (json.loads((tmp_path / "b" / f"run-00{i}.json").read_text())["finished"] for i in (1, 2))
    assert (first["status"], first["epochs_run"], second["status"], second["epochs_run"]) == \
        ("exited after epoch", 1, "completed", 1)
    assert second["best_ap"] == torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=False)["best_ap"]


def test_evaluation_does_not_depend_on_the_batch_size(tiny_coco, tmp_path, monkeypatch):
    """Batched evaluation padded each image to its partner's size, which moves a Swin or PVT image's
    own features; one image per forward gives the same detections at any --batch_size. (Untrained
    GFL boxes span about 16 strides, clipped to the image: large ground truth makes AP informative.)"""
    root = _copy_coco(tiny_coco, tmp_path / "coco")
    _edit(root, "val", lambda gt: gt["annotations"].extend(
        {"id": 500 + k, "image_id": im["id"], "category_id": 1 + k % 3, "bbox": [1, 2, im["width"] - 3, im["height"] - 4],
         "iscrowd": 0, "area": (im["width"] - 3) * (im["height"] - 4)} for k, im in enumerate(gt["images"])))
    scored = []
    import engine_detection
    score = engine_detection.coco_evaluate
    monkeypatch.setattr(engine_detection, "coco_evaluate", lambda gt, results, *a, **k: (
        scored.append(sorted(results, key=lambda r: (r["image_id"], -r["score"], r["bbox"]))), score(gt, results, *a, **k))[1])
    common = ["--eval", "--random_weights", "--score_thr", "0", "--test_size", "96", "64", "--fpn_dim", "64"]
    for b in (1, 2):
        _run(root, tmp_path / f"b{b}", *common, "--batch_size", b)
    ev1, ev2 = (json.loads((tmp_path / f"b{b}" / "eval.json").read_text()) for b in (1, 2))
    assert ev1["bbox"]["AR100"] > 0 and ev1["bbox"] == ev2["bbox"]
    assert len(scored[0]) > 0 and scored[0] == scored[1]  # bit-identical detections


def test_mask_rcnn_program_reports_box_and_mask_ap(tiny_coco, tmp_path):
    _run(tiny_coco, tmp_path, "--epochs", "1", "--detector", "mask_rcnn", "--model", "pvt_pico_128")
    ev = json.loads((tmp_path / "eval_epoch0.json").read_text())
    assert list(ev["bbox"]) == list(STAT_NAMES) and list(ev["segm"]) == list(STAT_NAMES)
    log = json.loads((tmp_path / "log.txt").read_text().splitlines()[0])
    assert {"train_loss_mask", "train_loss_classifier", "train_loss_objectness"} <= set(log)
