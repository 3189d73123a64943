"""N-channel, 16-bit and float images: readers, per-channel statistics, channel checks, weight
adaptation, figures, and grey / multispectral pretraining -> finetuning -> reconstruction end to end."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import main_finetune
import main_pretrain
import models
from engine.checkpoint import safe_load
from errors import CheckpointError, DataError, UsageError
from imagedata.channels import RGB, ChannelMismatch, Pixels, check_channels, read_array
from imagedata.datasets import build_pretrain_dataset, image_list
from imagedata.normstats import CACHE_NAME, resolve_stats
from util.pretrained import load_state

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("a", "b")


def _tiles(n: int, size: int, bands: int, seed: int) -> list[np.ndarray]:
    """Float32 (size, size, bands) tiles with spatial structure and distinct band levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        levels = rng.uniform(0.1, 0.9, bands)
        wave = 0.1 * np.sin(2 * np.pi * (rng.uniform(1, 3) * x + rng.uniform(1, 3) * y))
        out.append((levels[None, None, :] + wave[:, :, None] + rng.normal(0, 0.02, (size, size, bands)))
                   .astype(np.float32))
    return out


def _write(arr: np.ndarray, path: Path) -> Path:
    if path.suffix == ".tif":
        tifffile.imwrite(path, arr, photometric="minisblack", planarconfig="contig")
    elif path.suffix == ".npy":
        np.save(path, arr)
    else:  # 16-bit grey PNG
        Image.fromarray(arr[:, :, 0]).save(path)
    return path


def _dataset(root: Path, bands: int, ext: str, per_class: int = 4, size: int = 32) -> Path:
    """train/ and val/ class folders of ``ext`` files (.tif float32, .npy float32, .png 16-bit grey)."""
    k = 0
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, t in enumerate(_tiles(per_class, size, bands, seed=k)):
                k += 1
                if c:  # the second class: a bright square
                    t[8:20, 8:20] += 0.5
                if ext == ".png":
                    t = np.rint(np.clip(t, 0, 1) * 65535).astype(np.uint16)
                _write(t, folder / f"{i}{ext}")
    return root


# ---- readers

def test_readers_keep_dtype_and_band_order(tmp_path):
    arr = _tiles(1, 16, 13, 0)[0]
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.ascontiguousarray(arr.transpose(2, 0, 1)), photometric="minisblack",
                     planarconfig="separate")
    for path in (_write(arr, tmp_path / "x.tif"), planar, _write(arr, tmp_path / "x.npy")):
        got = read_array(path.read_bytes(), str(path))
        assert got.dtype == np.float32 and got.shape == (16, 16, 13), path
        np.testing.assert_array_equal(got, arr)
    grey16 = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    png = tmp_path / "g.png"
    Image.fromarray(grey16).save(png)
    got = read_array(png.read_bytes(), "g.png")
    assert got.dtype == np.uint16 and got.shape == (16, 16, 1)
    np.testing.assert_array_equal(got[:, :, 0], grey16)


def test_npy_with_pickled_objects_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="evil.npy"):
        read_array(path.read_bytes(), str(path))


def test_16_bit_ramp_keeps_full_precision_into_the_model_input(tmp_path):
    """A ramp 30000..30063 of 65535: 8 bits would make it one grey level (117); read at full
    precision, the pretraining batch keeps many distinct values off the 8-bit lattice."""
    ramp = (30000 + np.tile(np.arange(64, dtype=np.uint16), (64, 1)))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert len(np.unique(np.rint(ramp / 65535 * 255))) == 1  # what an 8-bit conversion keeps
    data = build_pretrain_dataset(str(tmp_path), 32, 1, seed=0, pixels=Pixels(1, (0.0,), (1.0,)))
    img, _, ok = data[(0, 0)]
    assert ok == 1 and img.shape == (1, 32, 32) and img.dtype == torch.float32
    values = img.unique()
    assert len(values) >= 16
    assert ((values * 255 - (values * 255).round()).abs() > 1e-3).any()  # not 8-bit values
    assert values.min() > 30000 / 65535 - 1e-3 and values.max() < 30064 / 65535 + 1e-3


# ---- channel checks

def test_other_channels_than_asked_is_one_line_naming_file_and_counts(tmp_path):
    data = _dataset(tmp_path / "ms", 13, ".tif", per_class=1)
    images = image_list(str(data), "train", labelled=False)
    with pytest.raises(ChannelMismatch, match=r"a/0\.tif has 13 channels, but the model takes --in_chans 4"):
        check_channels(images, 4)
    check_channels(images, 13)
    with pytest.raises(UsageError, match="has 13 channels.*--in_chans 3"):
        main_pretrain.parse_args(["--model", "mae_swin_pico_p1_32", "--data_path", str(data), "--output_dir",
                                  str(tmp_path / "o")])
    proc = subprocess.run([sys.executable, str(ROOT / "main_pretrain.py"), "--model", "mae_swin_pico_p1_32",
                           "--data_path", str(data), "--in_chans", "5", "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "has 13 channels" in proc.stderr


def test_imagenet_statistics_and_colour_augmentations_are_refused_for_other_channel_counts(tmp_path):
    data = _dataset(tmp_path / "ms", 4, ".npy", per_class=1)
    common = ["--model", "swin_pico_p1_32", "--data_path", str(data), "--in_chans", "4", "--output_dir",
              str(tmp_path / "o")]
    with pytest.raises(UsageError, match="--aa rand-m9-mstd0.5-inc1 .*RGB images only.*--aa none"):
        main_finetune.parse_args(common)
    with pytest.raises(UsageError, match="--color_jitter works on RGB images only"):
        main_finetune.parse_args(common + ["--aa", "none", "--color_jitter", "0.4"])
    with pytest.raises(UsageError, match="--norm_stats imagenet has 3 channels"):
        main_finetune.parse_args(common + ["--aa", "none", "--norm_stats", "imagenet"])
    config = main_finetune.parse_args(common + ["--aa", "none"])
    assert config.in_chans == 4 and config.norm_stats == "auto"


# ---- statistics

def test_auto_statistics_equal_a_direct_computation_and_are_cached(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "ms", 13, ".tif", per_class=2)
    images = image_list(str(data), "train", labelled=False)
    pixels = resolve_stats("auto", images, 13, seed=0, cache_dir=tmp_path / "out", log=lambda *a: None)
    every = np.stack([tifffile.imread(p) for p, _ in images.samples]).reshape(-1, 13).astype(np.float64)
    np.testing.assert_allclose(pixels.mean, every.mean(0), atol=1e-3)
    np.testing.assert_allclose(pixels.std, every.std(0), atol=1e-3)
    assert json.loads((tmp_path / "out" / CACHE_NAME).read_text())["mean"] == list(pixels.mean)
    import imagedata.normstats as ns
    monkeypatch.setattr(ns, "compute", lambda *a, **k: pytest.fail("the cache was not used"))
    assert resolve_stats("auto", images, 13, seed=0, cache_dir=tmp_path / "out") == pixels
    # the file auto wrote is a FILE --norm_stats reads
    assert resolve_stats(str(tmp_path / "out" / CACHE_NAME), images, 13, 0, None) == pixels


# ---- weights across channel counts

def _pair(in_chans):
    torch.manual_seed(0)
    rgb = models.create_model("swin_pico_p1_32", num_classes=4).eval()
    other = models.create_model("swin_pico_p1_32", num_classes=4, in_chans=in_chans).eval()
    return rgb, other


def test_rgb_weights_load_into_three_channels_unchanged_and_adapt_to_one():
    rgb, same = _pair(3)
    report = load_state(same, rgb.state_dict(), "rgb.pth")
    x = torch.randn(2, 3, 32, 32)
    assert not report.adapted and torch.equal(same(x), rgb(x))
    rgb, grey = _pair(1)
    report = load_state(grey, rgb.state_dict(), "rgb.pth")
    assert "adapted from 3 to 1 channels (timm adapt_input_conv)" in report.summary()
    g = torch.randn(2, 1, 32, 32)  # a grey image: the RGB model on (g, g, g) answers as the adapted one on g
    torch.testing.assert_close(grey(g), rgb(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
    rgb, ms = _pair(13)
    report = load_state(ms, rgb.state_dict(), "rgb.pth")
    assert "adapted from 3 to 13 channels" in report.summary()
    assert ms.patch_embed.proj.weight.shape[1] == 13


def test_weights_of_other_channels_than_rgb_are_refused():
    _, ms = _pair(13)
    rgb, _ = _pair(3)
    with pytest.raises(CheckpointError, match="ms.pth was trained on 13-channel images and the model takes 3: "
                                              "build it with --in_chans 13"):
        load_state(rgb, ms.state_dict(), "ms.pth")


# ---- figures

def test_figures_show_one_channel_in_grey_and_chosen_bands(tmp_path):
    from util.visualize import display_bands, save_figure
    n, unit = 2, 8
    grey = torch.randn(n, 1, 32, 32)
    panels = {"original": grey, "reconstruction": grey.clone(), "_sm": torch.zeros(n, 4, 4, dtype=torch.bool)}
    path = save_figure(panels, tmp_path / "g.png", "grey", unit, Pixels(1, (0.5,), (0.2,)))
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    assert len(np.unique(img)) > 20  # the stretched grey values, not a flat panel
    assert display_bands(13, [3, 2, 1]) == (3, 2, 1) and display_bands(2) == (0,)
    with pytest.raises(ValueError, match="--vis_bands 13: give 1 or 3 channel indices in 0..12"):
        display_bands(13, [13])


# ---- end to end

@pytest.mark.parametrize("kind", ["tif-shards", "png16-folder"])
def test_pretrain_finetune_and_reconstruct_end_to_end(tmp_path, kind, one_thread):
    """13-band float32 TIFF shards and a 16-bit grey PNG folder: UM-MAE Swin and PVT pretrain (auto
    statistics), the Swin checkpoint finetunes with the statistics it stored, and reconstructs."""
    bands, ext = (13, ".tif") if kind == "tif-shards" else (1, ".png")
    data = _dataset(tmp_path / "raw", bands, ext, per_class=2)
    if kind == "tif-shards":
        from tools import make_shards
        assert make_shards.main(["--data_path", str(data), "--output_dir", str(tmp_path / "shards"),
                                 "--shard_size", "2"]) == 0
        data = tmp_path / "shards"
    common = ["--in_chans", str(bands), "--norm_stats", "auto", "--data_path", str(data), "--epochs", "1",
              "--warmup_epochs", "0", "--batch_size", "4", "--num_workers", "0", "--print_freq", "1000",
              "--device", "cpu"]
    for model in ("mae_swin_pico_p1_32", "mae_pvt_pico_p1_32"):
        out = tmp_path / model
        config = main_pretrain.parse_args(["--model", model, "--output_dir", str(out), *common])
        assert main_pretrain.main(config) == 0
        assert (out / "reconstruction-0.png").is_file() and (out / CACHE_NAME).is_file()
    ckpt = safe_load(tmp_path / "mae_swin_pico_p1_32" / "checkpoint-last.pth")
    stats = json.loads((tmp_path / "mae_swin_pico_p1_32" / CACHE_NAME).read_text())
    assert ckpt["config"]["in_chans"] == bands and list(ckpt["config"]["norm_mean"]) == stats["mean"]
    assert ckpt["model"]["patch_embed.proj.weight"].shape[1] == bands

    ft = main_finetune.parse_args(["--finetune", str(tmp_path / "mae_swin_pico_p1_32" / "checkpoint-last.pth"),
                                   "--data_path", str(data), "--epochs", "1", "--warmup_epochs", "0",
                                   "--batch_size", "4", "--num_workers", "0", "--aa", "none", "--device", "cpu",
                                   "--output_dir", str(tmp_path / "ft")])
    assert ft.model == "swin_pico_p1_32" and ft.in_chans == bands and ft.norm_stats == "checkpoint"
    assert list(ft.norm_mean) == stats["mean"]
    assert main_finetune.main(ft) == 0
    assert safe_load(tmp_path / "ft" / "checkpoint-last.pth")["config"]["norm_std"] == ckpt["config"]["norm_std"]

    files = sorted((tmp_path / "raw" / "val").rglob(f"*{ext}"))[:2]
    from tools import reconstruct
    args = reconstruct.get_args_parser().parse_args([
        "--checkpoint", str(tmp_path / "mae_pvt_pico_p1_32" / "checkpoint-last.pth"), "--images", *map(str, files),
        "--output", str(tmp_path / "rec.png"), *(["--vis_bands", "3", "2", "1"] if bands == 13 else [])])
    assert reconstruct.main(args) == 0
    assert Image.open(tmp_path / "rec.png").size[0] > 4 * 32
