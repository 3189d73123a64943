"""tools/reconstruct.py on a checkpoint from a tiny run; figure legends from the model's own masks."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
import models
from tools import reconstruct as rec
from util.cli import UsageError
from util.visualize import caption_for, mask_legend, save_figure, spread_indices

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "sample_images"


def test_reconstruct_named_images_from_a_tiny_runs_checkpoint(tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()
    for i in range(2):   # one step of a tiny run: all this test needs is a real checkpoint
        Image.fromarray((np.random.default_rng(i).random((96, 96, 3)) * 255).astype(np.uint8)).save(data / f"{i}.png")
    main_pretrain.main(main_pretrain.parse_args(["--data_path", str(data),
        "--model", "mae_vit_pico_patch16", "--mask_ratio", "0.75", "--norm_pix_loss", "--num_workers", "0",
        "--print_freq", "1000", "--device", "cpu", "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0",
        "--vis_freq", "0", "--output_dir", str(out), "--log_dir", ""]))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    png = tmp_path / "rec.png"
    argv = ["--checkpoint", str(out / "checkpoint-last.pth"), "--images", str(tmp_path / "bad.jpg"),
            str(SAMPLES / "chelsea_cat.jpg"), str(SAMPLES), "--output", str(png), "--max_images", "4", "--denorm", "true"]
    assert rec.main(rec.get_args_parser().parse_args(argv)) == 0
    text = capsys.readouterr()
    assert "skipped" in text.err and "bad.jpg" in text.err
    assert "wrote" in text.out and "mae_vit_pico_patch16" in text.out and "denorm true" in text.out
    fig = Image.open(png)
    assert fig.width == 4 * (96 + 4) + 4 and fig.height > 3 * 96        # 4 panels; 3 readable images
    with pytest.raises(UsageError, match="pass --model"):
        torch.save({"model": torch.load(out / "checkpoint-last.pth", weights_only=False)["model"]}, tmp_path / "bare.pth")
        rec.build(rec.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "bare.pth"), "--images", "x"]))
    # a bare (reference-style) state dict loads when the model is named
    model, flags = rec.build(rec.get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path / "bare.pth"), "--images", "x", "--model", "mae_vit_pico_patch16"]))
    assert flags.input_size == 96 and not flags.norm_pix_loss


def test_figure_legend_follows_the_models_masks_and_the_header_fits(tmp_path):
    ummae = models.create_model("mae_swin_pico_128", vis_mask_ratio=0.25, norm_pix_loss=True)
    assert "red outline = secondary-masked" in caption_for(ummae, "neighbour")
    for name in ("mixmim_pico", "greenmim_swin_pico_patch4_win6_dec64b1", "simmim_swin_pico_128"):
        legend = mask_legend(models.create_model(name))
        assert "secondary" not in legend, name
    assert "partner" in mask_legend(models.create_model("mixmim_pico"))
    panels = {k: torch.zeros(2, 3, 32, 32) for k in ("original", "seen", "reconstruction", "reconstruction + visible")}
    panels["_mask"] = panels["_sm"] = torch.zeros(2, 2, 2, dtype=torch.bool)
    caption = "a long caption " * 20
    path = save_figure(panels, tmp_path / "f.png", caption, 16)
    img = np.asarray(Image.open(path).convert("L"))
    header = img.shape[0] - (2 * (32 + 4) + 4)
    assert header > 60                                    # every caption line got room
    assert (img[header:header + 4] == 255).all()          # nothing drawn into the gap above the panels
    assert spread_indices(100, 4) == [0, 33, 66, 99] and spread_indices(3, 4) == [0, 1, 2]


def test_16_bit_images_are_scaled_and_bad_output_or_counts_fail_before_the_model_runs(tmp_path, monkeypatch):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)   # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    img = rec.load_images([tmp_path / "grey16.png"], 32)[0]
    mean = float(img.mean() * 0.226 + 0.449)      # back to [0, 1] (roughly: the channels' mean std and mean)
    assert 0.3 < mean < 0.7, mean                 # a mid-grey ramp, not white (1.0) as convert("RGB") gave
    built = []
    monkeypatch.setattr(rec, "build", lambda args: built.append(1))
    base = ["--checkpoint", "x.pth", "--images", str(tmp_path / "grey16.png")]
    with pytest.raises(UsageError, match="--output /proc/r3.png cannot be written|folder /proc"):
        rec.main(rec.get_args_parser().parse_args(base + ["--output", "/proc/r3.png"]))
    with pytest.raises(UsageError, match="--output .* is a folder"):
        rec.main(rec.get_args_parser().parse_args(base + ["--output", str(tmp_path)]))
    with pytest.raises(UsageError, match="--max_images must be >= 1, got 0"):
        rec.main(rec.get_args_parser().parse_args(base + ["--max_images", "0"]))
    assert not built
