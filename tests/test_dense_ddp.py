"""Detection and segmentation under a real 2-rank torchrun (gloo): the first step's loss agrees with
one process, and sharded evaluation gives exactly the numbers of a one-process evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segmentation.toy import NUM_CLASSES, make_toy_ade
from tools.make_tiny_coco import make_tiny_coco
from engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def launch(program: str, argv: list, ranks: int) -> None:
    """One process, or ``ranks`` processes under torchrun; fails the test with the tail of stderr."""
    cmd = [PY, str(ROOT / program)] if ranks == 1 else [
        PY, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
        str(ROOT / program)]
    proc = subprocess.run(cmd + [str(a) for a in argv], env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


# Drop path and the neck's BatchNorm are off: both work per rank (each process's torch RNG; per-rank
# batch statistics on CPU), so with them a 2-rank run is a different, equally valid run. FPN width 64:
# the head's GroupNorm (32 groups) at width 32 would normalise single values on the 1x1 top level of a
# 64-px image with one image per rank, which torch refuses.
DET = ["--model", "swin_pico_128", "--input_size", "64", "--test_size", "64", "64", "--adapter_dim", "32",
       "--fpn_dim", "64", "--neck_norm", "none", "--drop_path", "0", "--warmup_iters", "1", "--lr", "1e-3",
       "--num_workers", "0", "--print_freq", "100", "--device", "cpu", "--log_dir", ""]


def test_detection_two_ranks_log_one_process_losses_and_evaluate_identically(tmp_path):
    """The first step sees the same images with the same augmentation and the same weights in both
    runs, so its classification loss (QFL summed / positives averaged over ranks) must equal the
    one-process value; the logged terms are means over ranks, not sums. The GIoU and DFL terms are
    divided by the rank-mean of the positives' scores clamped at 1, as mmdet's GFL head: while those
    scores sum to less than 1 per rank (untrained toy models) 2 ranks and 1 process normalise them
    differently, so they and the weights after the step are not compared."""
    coco = make_tiny_coco(tmp_path / "coco", n_train=4, n_val=3, size=64)
    common = DET + ["--data_path", coco, "--epochs", "1"]
    launch("main_detection.py", common + ["--batch_size", "2", "--output_dir", tmp_path / "ddp"], ranks=2)
    launch("main_detection.py", common + ["--batch_size", "4", "--output_dir", tmp_path / "one"], ranks=1)
    ddp, one = (json.loads((tmp_path / d / "log.txt").read_text().splitlines()[0]) for d in ("ddp", "one"))
    assert one["train_loss_cls"] > 0
    assert ddp["train_loss_cls"] == pytest.approx(one["train_loss_cls"], rel=1e-4)

    # One image per batch on every rank: each image's forward is the same computation, so the
    # gathered detections, and all 12 COCO numbers, must be identical.
    ckpt = tmp_path / "one" / "checkpoint-last.pth"
    for ranks, out in ((2, "ev2"), (1, "ev1")):
        launch("main_detection.py", DET + ["--data_path", coco, "--eval", "--resume", ckpt, "--batch_size", "1",
                                           "--output_dir", tmp_path / out], ranks=ranks)
    ev2, ev1 = (json.loads((tmp_path / o / "eval.json").read_text()) for o in ("ev2", "ev1"))
    assert ev2["bbox"] == ev1["bbox"] and len(ev1["bbox"]) == 12


SEG = ["--model", "swin_pico_128", "--input_size", "64", "--img_scale", "128", "64", "--nb_classes",
       NUM_CLASSES, "--num_workers", "0", "--device", "cpu", "--log_dir", "", "--print_freq", "100",
       "--channels", "32", "--aux_channels", "16", "--lr", "2e-3", "--warmup_iters", "1", "--test_stride", "32",
       "--no_photometric", "--ratio_range", "1.0", "1.5"]


def test_segmentation_two_ranks_train_and_evaluate_identically(tmp_path):
    toy = make_toy_ade(tmp_path / "toy", n_train=4, n_val=3)
    # UperNet's BatchNorm is per rank on CPU (SyncBatchNorm needs CUDA), so training is not compared
    # with one process; the run must finish with one consistent checkpoint and log.
    launch("main_segmentation.py", SEG + ["--data_path", toy, "--iters", "2", "--eval_interval", "2",
                                          "--batch_size", "2", "--output_dir", tmp_path / "ddp"], ranks=2)
    log = [json.loads(l) for l in (tmp_path / "ddp" / "log.txt").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2]
    ckpt = tmp_path / "ddp" / "checkpoint-last.pth"
    assert json.loads(ckpt.with_name(ckpt.name + ".json").read_text())["current"]["world_size"] == 2

    # Sharded evaluation (each validation image on one rank, confusion matrices summed) equals one process.
    for ranks, out in ((2, "ev2"), (1, "ev1")):
        launch("main_segmentation.py", SEG + ["--data_path", toy, "--eval", "--resume", ckpt, "--test_mode", "both",
                                              "--output_dir", tmp_path / out], ranks=ranks)
    ev2, ev1 = (json.loads((tmp_path / o / "eval.json").read_text()) for o in ("ev2", "ev1"))
    for mode in ("slide", "whole"):
        assert ev2[mode]["images"] == ev1[mode]["images"] == 3
        assert ev2[mode] == ev1[mode], mode
