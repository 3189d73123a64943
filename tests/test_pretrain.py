"""The pretraining program: learning, DDP, exact resume, outputs and bad input."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import main_pretrain
from engine.checkpoint import safe_load
from errors import UsageError
from tiny_data import make_images

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = ["--model", "mae_swin_pico_128", "--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss",
        "--num_workers", "0", "--print_freq", "1000", "--device", "cpu"]




def run(argv, expect_code=0):
    args = main_pretrain.parse_args(argv)
    code = main_pretrain.main(args)
    assert code == expect_code
    return args


def losses(out: Path) -> list[float]:
    return [json.loads(l)["train_loss"] for l in (out / "log.txt").read_text().splitlines()]


def final_weights(out: Path) -> dict:
    return safe_load(out / "checkpoint-last.pth")["model"]


def test_short_pretraining_run_learns_and_writes_outputs(tmp_path):
    out = tmp_path / "out"   # no --data_path: the bundled sample photos
    run(TINY + ["--batch_size", "4", "--epochs", "4", "--warmup_epochs", "1",
                "--lr", "1e-3", "--output_dir", str(out), "--log_dir", str(out / "tb"), "--save_freq", "2"])
    ls = losses(out)
    assert len(ls) == 4 and ls[-1] < 0.8 * ls[0], ls
    for name in ("checkpoint-1.pth", "checkpoint-3.pth", "checkpoint-last.pth", "reconstruction-3.png"):
        assert (out / name).is_file(), name
    ckpt = safe_load(out / "checkpoint-3.pth")
    assert set(ckpt) >= {"model", "optimizer", "epoch", "scaler", "args"} and ckpt["epoch"] == 3
    assert ckpt["args"].model == "mae_swin_pico_128"
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    record = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert {"train_loss", "train_lr", "train_images_per_sec", "train_peak_mem_mb"} <= set(record)
    assert Image.open(out / "reconstruction-3.png").size[0] > 4 * 128


def test_resume_is_bit_exact(tmp_path):
    data = make_images(tmp_path / "data", n=12)
    common = TINY + ["--data_path", str(data), "--batch_size", "4", "--accum_iter", "2", "--epochs", "4",
                     "--warmup_epochs", "1", "--lr", "1e-3", "--log_dir", ""]
    run(common + ["--output_dir", str(tmp_path / "full")])
    run(common + ["--output_dir", str(tmp_path / "split"), "--exit_after_epoch", "1"])
    assert safe_load(tmp_path / "split" / "checkpoint-last.pth")["epoch"] == 1
    run(common + ["--output_dir", str(tmp_path / "split")])          # auto-resume
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa = safe_load(tmp_path / "full" / "checkpoint-last.pth")["optimizer"]["state"]
    ob = safe_load(tmp_path / "split" / "checkpoint-last.pth")["optimizer"]["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")


def test_explicit_resume_path_and_corrupt_newest_falls_back(tmp_path, capsys):
    data = make_images(tmp_path / "data", n=8)
    out = tmp_path / "out"
    common = TINY + ["--data_path", str(data), "--batch_size", "4", "--epochs", "3", "--warmup_epochs", "1",
                     "--log_dir", "", "--output_dir", str(out), "--save_freq", "1"]
    run(common + ["--exit_after_epoch", "1"])
    (out / "checkpoint-last.pth").write_bytes(b"garbage")           # a damaged newest file
    capsys.readouterr()
    run(common)
    text = capsys.readouterr().out
    assert "skipped checkpoint-last.pth" in text and "corrupt" in text and "checkpoint-1.pth" in text
    assert safe_load(out / "checkpoint-last.pth")["epoch"] == 2


def test_torchrun_two_ranks_match_each_other_and_one_process(tmp_path):
    data = make_images(tmp_path / "data", n=16)
    common = ["--model", "mae_swin_pico_128", "--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss",
              "--num_workers", "0", "--device", "cpu", "--data_path", str(data), "--epochs", "2",
              "--warmup_epochs", "1", "--lr", "1e-3", "--accum_iter", "2", "--log_dir", "", "--print_freq", "1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    port = str(__import__("engine.distributed", fromlist=["free_port"]).free_port())
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           str(ROOT / "main_pretrain.py"), *common, "--batch_size", "2",
                           "--output_dir", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks print at the same moment into torchrun's one stdout: read the lines wherever they landed
    digests = dict(re.findall(r"rank (\d+): final weights digest ([0-9a-f]+)", proc.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], proc.stdout[-2000:]
    run(common + ["--batch_size", "4", "--output_dir", str(tmp_path / "single")])
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k


def test_reference_command_lines_parse_to_the_intended_settings(tmp_path):
    data = make_images(tmp_path / "data", n=4)
    cmd = ("--batch_size 128 --accum_iter 4 --model mae_swin_tiny_256 --mask_regular --vis_mask_ratio 0.25 "
           "--input_size 256 --token_size 16 --norm_pix_loss --mask_ratio 0.75 --epochs 200 --warmup_epochs 10 "
           "--blr 1.5e-4 --weight_decay 0.05 --local-rank=3").split()
    args = main_pretrain.parse_args(cmd + ["--data_path", str(data), "--output_dir", str(tmp_path / "o"),
                                           "--log_dir", str(tmp_path / "o")])
    assert (args.model, args.batch_size, args.accum_iter, args.input_size, args.token_size) == \
        ("mae_swin_tiny_256", 128, 4, 256, 16)
    assert args.mask_regular and args.norm_pix_loss and args.vis_mask_ratio == 0.25
    assert (args.epochs, args.warmup_epochs, args.blr, args.weight_decay) == (200, 10, 1.5e-4, 0.05)
    assert main_pretrain.effective_lr(args, world_size=8) == pytest.approx(2.4e-3)
    vit = ("--batch_size 128 --accum_iter 4 --model mae_vit_base_patch16_dec512d2b --input_size 224 "
           "--token_size 14 --norm_pix_loss --mask_ratio 0.75 --epochs 200 --warmup_epochs 10 --blr 1.5e-4 "
           "--weight_decay 0.05 --local_rank 0").split()
    args = main_pretrain.parse_args(vit + ["--data_path", str(data), "--output_dir", str(tmp_path / "v")])
    assert not args.mask_regular and args.token_size == 14
    args = main_pretrain.parse_args(vit + ["--mask_regular", "--vis_mask_ratio", "0.25", "--bf16",
                                           "--data_path", str(data), "--output_dir", str(tmp_path / "v")])
    assert args.mask_regular and args.amp == "bf16"


@pytest.mark.parametrize("extra,message", [
    (["--model", "mae_swin_huge_256"], "unknown --model 'mae_swin_huge_256'; did you mean mae_swin_large_256"),
    (["--input_size", "224"], "nearest valid sizes: 128, 256"),
    (["--input_size", "256", "--token_size", "14"], "use --token_size 16"),
    (["--mask_ratio", "0.6"], "--mask_ratio must be 0.75"),
    (["--data_path", "/nonexistent/folder"], "does not exist"),
    (["--empty_data"], "contains no images"),
    (["--output_dir", "/proc/version/sub"], "is not writable"),
])
def test_bad_input_fails_before_any_compute(tmp_path, extra, message, capsys):
    argv = ["--model", "mae_swin_tiny_256", "--mask_regular", "--output_dir", str(tmp_path / "o"), "--log_dir", ""]
    if extra == ["--empty_data"]:
        (tmp_path / "empty").mkdir()
        extra = ["--data_path", str(tmp_path / "empty")]
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        main_pretrain.parse_args(argv + extra)
    # and as a program: one line on stderr, exit code 2
    if extra[:1] == ["--model"]:
        proc = subprocess.run([PY, str(ROOT / "main_pretrain.py"), *argv, *extra], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "valid pretraining models" in proc.stderr


def test_a_model_that_takes_only_uniform_masks_implies_mask_regular(tmp_path):
    """The contract knows that UM-MAE's pyramid models take only uniform masks: --mask_regular is
    implied (the reference's command lines, which give it, parse to the same config)."""
    common = ["--model", "mae_swin_tiny_256", "--output_dir", str(tmp_path / "o"), "--log_dir", ""]
    implied, given = main_pretrain.parse_args(common), main_pretrain.parse_args(common + ["--mask_regular"])
    assert implied.mask_regular and implied.mask_ratio == 0.75
    assert {k: v for k, v in vars(implied).items() if k != "launch_command"} == \
        {k: v for k, v in vars(given).items() if k != "launch_command"}
    with pytest.raises(UsageError, match="--mask_regular keeps one unit per 2x2 group"):
        main_pretrain.parse_args(common + ["--mask_ratio", "0.6"])


def test_unreadable_image_is_skipped_with_a_warning_and_counted(tmp_path):
    data = make_images(tmp_path / "data", n=8)
    (data / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpg"):
        run(TINY + ["--data_path", str(data), "--batch_size", "3", "--epochs", "1", "--warmup_epochs", "0",
                    "--output_dir", str(out), "--log_dir", ""])
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["train_skipped_images"] >= 1


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    data = make_images(tmp_path / "data", n=8)
    out = tmp_path / "out"
    common = TINY + ["--data_path", str(data), "--batch_size", "4", "--epochs", "3", "--warmup_epochs", "0",
                     "--output_dir", str(out), "--log_dir", "", "--save_freq", "1"]
    run(common + ["--exit_after_epoch", "0"])
    good = (out / "checkpoint-last.pth").read_bytes()
    import models.mae as mae
    original = mae._PyramidMAE.forward
    calls = {"n": 0}

    def poisoned(self, imgs, mask, sm_mask=None):
        out = original(self, imgs, mask, sm_mask)
        calls["n"] += 1
        # calls 1-2: the start-up FLOP count (engine_pretrain.train_flops_per_image); 3: epoch 1, step 0
        return out._replace(loss=out.loss * float("nan")) if calls["n"] == 4 else out
    monkeypatch.setattr(mae._PyramidMAE, "forward", poisoned)
    args = main_pretrain.parse_args(common)
    assert main_pretrain.main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at epoch 1, step 1" in err and "checkpoint" in err
    assert (out / "checkpoint-last.pth").read_bytes() == good
