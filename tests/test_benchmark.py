"""tools/benchmark.py on the pico models: it runs, and its JSON has the expected fields (no timing checks)."""
import json
import math

import pytest

import models
from tools import benchmark

ROW_FIELDS = {"model", "input_size", "batch_size", "images_per_sample", "images_per_step", "mask", "vis_mask_ratio",
              "norm_pix_loss", "params", "trainable_params", "median_step_s", "step_times_s", "images_per_s",
              "flops_per_step", "flops_per_image", "saved_tensor_bytes", "saved_tensor_bytes_per_image",
              "peak_mem_bytes", "memory_bytes", "memory_bytes_per_image", "final_loss", "ratios"}


def test_cli_writes_a_table_and_valid_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    names = ["mae_swin_pico_128", "simmim_swin_pico_128", "mae_vit_pico_patch16"]
    benchmark.main(["--models", *names, "--batch_size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
                    "--threads", "2", "--json", str(out)])
    stdout = capsys.readouterr().out
    assert stdout.startswith("| model |") and "simmim_swin_pico_128" in stdout
    report = json.loads(out.read_text())
    assert report["baseline"] == "simmim_swin_pico_128"          # the first simmim_* by default
    assert report["memory_metric"].startswith("saved_tensors") and report["device"] == "cpu"
    assert report["threads"] == 2 and report["torch"] and report["hardware"]["cpu"]
    assert "--models" in report["command"] and report["steps"] == 2 and report["warmup"] == 1
    rows = {r["model"]: r for r in report["results"]}
    assert list(rows) == names
    for name, r in rows.items():
        assert set(r) >= ROW_FIELDS, name
        assert len(r["step_times_s"]) == 2 and r["median_step_s"] > 0 and r["images_per_s"] > 0
        assert r["flops_per_image"] > 0 and r["saved_tensor_bytes"] > 0 and r["peak_mem_bytes"] is None
        assert r["memory_bytes"] == r["saved_tensor_bytes"] and math.isfinite(r["final_loss"])
        assert set(r["ratios"]) == {"time", "memory", "flops"}
    assert rows["simmim_swin_pico_128"]["ratios"] == {"time": 1.0, "memory": 1.0, "flops": 1.0}
    # the recipes: UM-MAE gets uniform masks, secondary masking and norm-pix; SimMIM random masks, raw pixels
    um, sim, vit = rows["mae_swin_pico_128"], rows["simmim_swin_pico_128"], rows["mae_vit_pico_patch16"]
    assert (um["mask"], um["vis_mask_ratio"], um["norm_pix_loss"]) == ("uniform", 0.25, True)
    assert (sim["mask"], sim["vis_mask_ratio"], sim["norm_pix_loss"]) == ("random 0.75", 0.0, False)
    assert (vit["mask"], vit["vis_mask_ratio"], vit["input_size"]) == ("random 0.75", 0.0, 96)
    # the encoder of UM-MAE sees a quarter of the image: it must be cheaper than SimMIM's full-resolution one
    assert um["ratios"]["flops"] > 1.5 and um["ratios"]["memory"] > 1.5


def test_per_image_figures_use_images_per_sample(monkeypatch, capsys):
    monkeypatch.setattr(models.simmim.SimMIMPVT, "images_per_sample", 2, raising=False)
    report = benchmark.main(["--models", "simmim_pvt_pico_128", "--baseline", "simmim_pvt_pico_128",
                             "--batch_size", "1", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    (r,) = report["results"]
    assert r["images_per_step"] == 2 and r["images_per_sample"] == 2
    assert r["flops_per_image"] == r["flops_per_step"] / 2
    assert r["images_per_s"] == pytest.approx(2 / r["median_step_s"])
    assert "| simmim_pvt_pico_128 | 128 | 1x2 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--models", "no_such_model"], "unknown model"),
    (["--models", "simmim_pvt_pico_128", "--baseline", "mae_pvt_pico_128"], "not in --models"),
])
def test_bad_flags_fail_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(argv)
    assert message in capsys.readouterr().err
