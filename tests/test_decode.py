"""--decode fast / gpu: the same crop and flip draws as the PIL path, the same pixels within a grey level or
a few, bad files named; the GPU path's batched crop code runs here on CPU tensors."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomHorizontalFlip, RandomResizedCrop

from util.datasets import PRETRAIN_SCALE, pretrain_transform, seeded_apply
from util.decode import (Encoded, FastPretrainTransform, PlanTransform, decode_planned, draw_crop,
                         GpuDecodeLoader, collate_planned)

LEVEL = 1 / 255 / 0.225  # one grey level in normalised units (the smallest std)


def photo(w, h, seed, fmt="JPEG", mode="RGB", noise=12.0):
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((9, 12, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.clip(np.asarray(base, dtype=np.float32) + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(a).convert(mode)
    b = io.BytesIO()
    img.save(b, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return b.getvalue()


def pil_path(data, size, seed):
    return seeded_apply(pretrain_transform(size), Image.open(io.BytesIO(data)).convert("RGB"), seed)


def pil_draws(data, seed):
    """The (box, flip) the PIL path draws: RandomResizedCrop's get_params, then the flip's rand."""
    img = Image.open(io.BytesIO(data))
    return seeded_apply(lambda im: (RandomResizedCrop.get_params(im, list(PRETRAIN_SCALE), [3 / 4, 4 / 3]),
                                    bool(torch.rand(1) < 0.5)), img, seed)


def test_crop_boxes_and_flips_are_the_pil_paths_draws():
    data = photo(120, 90, 0)
    plan = PlanTransform(32)
    boxes = []
    for seed in range(300):
        p = seeded_apply(plan, Encoded(data, "x"), seed)
        assert (tuple(p.box), p.flip) == pil_draws(data, seed)
        boxes.append(p.box)
    area = np.array([h * w / (90 * 120) for _, _, h, w in boxes])
    assert 0.2 - 1e-9 <= area.min() and area.max() <= 1.0 and 0.4 < area.mean() < 0.6  # (large areas of extreme aspect are redrawn)
    flips = [seeded_apply(plan, Encoded(data, "x"), s).flip for s in range(300)]
    assert 100 < sum(flips) < 200


@pytest.mark.parametrize("w,h,fmt,mode,size,tol_mean", [(120, 90, "JPEG", "RGB", 64, 0.5), (100, 80, "PNG", "RGB", 32, 0.5),
                                                         (90, 120, "JPEG", "L", 64, 0.5), (700, 560, "JPEG", "RGB", 32, 6.0)])
def test_fast_path_gives_the_pil_paths_images(w, h, fmt, mode, size, tol_mean):
    """Full-scale decodes: within two grey levels of the PIL path (torch and PIL round their two resize passes differently). 700x560 at 32 px: most crops are
    decoded at 1/2 .. 1/8 scale (DCT scaling instead of a bicubic reduction): on a smooth photo (no
    pixel noise) within six levels on average -- PIL draft + crop (the PIL path for such images with
    ImageList.min_side) differs from a full decode by 1.5-6 levels here too -- so the box is
    mapped to the reduced image where it belongs."""
    data = photo(w, h, 1, fmt, mode, noise=0.0 if w > 500 else 12.0)
    fast = FastPretrainTransform(size)
    for seed in range(6):
        a, b = pil_path(data, size, seed), seeded_apply(fast, Encoded(data, "x"), seed)
        assert a.shape == b.shape == (3, size, size)
        diff = (a - b).abs() / LEVEL
        assert diff.mean() <= tol_mean, (seed, diff.mean())
        if tol_mean < 1:
            assert diff.max() <= 2.01, (seed, diff.max())


def test_batched_gpu_crop_code_on_cpu_tensors_matches_the_pil_path():
    datas = [photo(120, 90, 2), photo(90, 120, 3), photo(100, 80, 4, "PNG"), photo(64, 64, 5, "JPEG", "L")]
    plan = PlanTransform(32)
    planned = [seeded_apply(plan, Encoded(d, f"img{i}"), 10 + i) for i, d in enumerate(datas)]
    imgs, ok = decode_planned(planned, 32, torch.device("cpu"), float_kernel=True)  # the GPU's float kernel
    assert imgs.shape == (4, 3, 32, 32) and ok.tolist() == [1, 1, 1, 1]
    for i, d in enumerate(datas):
        diff = (imgs[i] - pil_path(d, 32, 10 + i)).abs() / LEVEL
        assert diff.mean() < 0.5 and diff.max() <= 6, (i, diff.mean(), diff.max())


def test_undecodable_images_are_named_and_replaced_in_a_batch():
    good = photo(80, 60, 6)
    truncated = good[: len(good) // 3]
    plan = PlanTransform(32)
    items = [(seeded_apply(plan, Encoded(good, "good.jpg"), 0), 0, 1),
             (seeded_apply(plan, Encoded(truncated + b"\x00" * 10, "broken.jpg"), 1), 1, 1)]
    planned, labels, ok = collate_planned(items)
    with pytest.warns(UserWarning, match="broken.jpg"):
        imgs, decoded_ok = decode_planned(planned, 32, torch.device("cpu"))
    assert decoded_ok.tolist() == [1, 0] and torch.equal(imgs[0], imgs[1])
    with pytest.raises(Exception):  # not an image at all: the worker's header read fails, the data set names it
        seeded_apply(plan, Encoded(b"hello", "text.jpg"), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU decoder)")
def test_gpu_decode_matches_the_cpu_run_of_the_same_code():
    datas = [photo(500, 375, i) for i in range(8)]
    plan = PlanTransform(256)
    planned = [seeded_apply(plan, Encoded(d, f"img{i}"), i) for i, d in enumerate(datas)]
    gpu, ok = decode_planned(planned, 256, torch.device("cuda"))
    cpu, _ = decode_planned(planned, 256, torch.device("cpu"), float_kernel=True)
    assert ok.all() and ((gpu.cpu() - cpu).abs() / LEVEL).mean() < 1.0  # nvJPEG's IDCT differs slightly
    loader = GpuDecodeLoader([collate_planned([(p, 0, 1) for p in planned])], 256, torch.device("cuda"))
    imgs, _, _ = next(iter(loader))
    assert imgs.device.type == "cuda" and imgs.shape == (8, 3, 256, 256)


def test_image_folder_with_fast_decoding_replaces_a_corrupt_file(tmp_path):
    from util.datasets import SeededImageDataset, image_list
    (tmp_path / "a.jpg").write_bytes(photo(80, 60, 7))
    (tmp_path / "b.jpg").write_bytes(photo(80, 60, 8)[:300])  # truncated
    images = image_list(str(tmp_path), "train", labelled=False)
    images.raw = True
    ds = SeededImageDataset(images, FastPretrainTransform(32))
    with pytest.warns(UserWarning, match="b.jpg"):
        img, _, ok = ds[(1, 5)]
    assert ok == 0 and img.shape == (3, 32, 32)
    assert torch.equal(ds[(0, 5)][0], img)  # a.jpg with the same draws


def test_loader_benchmark_writes_a_table_and_json(tmp_path, capsys):
    import json
    from tools import loader_benchmark
    out = tmp_path / "bench.json"
    report = loader_benchmark.main(["--images", "8", "--size", "120", "90", "--input_size", "32", "--batch_size", "4",
                                    "--rounds", "1", "--workers", "0", "--json", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"]))
    paths = [r["path"] for r in report["results"]]
    assert paths[:4] == ["folder+pil", "shards+pil", "shards+fast", "folder+fast"]
    assert all(r["per_worker"] > 0 and r["total"] > 0 for r in report["results"])
    assert "| shards+fast |" in capsys.readouterr().out


def test_fast_decoding_refuses_the_decompression_bombs_the_pil_path_refuses(monkeypatch):
    data = photo(64, 48, 0)                       # 3072 pixels: a bomb under a limit of 1000 (PIL refuses > 2x)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    for transform in (FastPretrainTransform(32), PlanTransform(32)):
        with pytest.raises(Image.DecompressionBombError, match="bomb.jpg: 64x48 = 3,072 pixels, over the limit"):
            seeded_apply(transform, Encoded(data, "bomb.jpg"), 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)   # within twice the limit: decoded, as PIL does
    assert seeded_apply(FastPretrainTransform(32), Encoded(data, "ok.jpg"), 0).shape == (3, 32, 32)
