"""Detection and segmentation under a real 2-rank torchrun (gloo): the first step's loss agrees with
one process, sharded evaluation gives exactly the numbers of a one-process evaluation (whatever
--batch_size), and rank 0 scoring alone for longer than --dist_timeout does not fail the run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segmentation.toy import NUM_CLASSES, make_toy_ade
from tools.make_tiny_coco import make_tiny_coco
from util.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def launch(program, argv: list, ranks: int) -> None:
    """One process, or ``ranks`` processes under torchrun; fails the test with the tail of stderr."""
    cmd = [PY, str(ROOT / program)] if ranks == 1 else [
        PY, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
        str(ROOT / program)]
    proc = subprocess.run(cmd + [str(a) for a in argv], env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


# Drop path and the neck's BatchNorm are off: both work per rank (each process's torch RNG; per-rank
# batch statistics on CPU), so with them a 2-rank run is a different, equally valid run. FPN width 32:
# the head's GroupNorm groups then hold one value on the 1x1 top level of a 64-px image with one image
# per rank (nn.GroupNorm refuses that; the head's GroupNorm normalises it to 0).
DET = ["--model", "swin_pico_128", "--input_size", "64", "--test_size", "64", "64", "--adapter_dim", "32",
       "--fpn_dim", "32", "--neck_norm", "none", "--drop_path", "0", "--warmup_iters", "1", "--lr", "1e-3",
       "--num_workers", "0", "--print_freq", "100", "--device", "cpu", "--log_dir", ""]


SCORING = """
import json, time
import main_detection
from util.cli import run_main
score, calls = main_detection.coco_evaluate, []

def watched(gt, results, *a, **k):  # rank 0's first scoring takes {seconds} s longer (COCO val2017: minutes)
    if not calls:
        time.sleep({seconds})
    calls.append(1)
    with open({dump!r}, "w") as f:  # the gathered detections, in a rank-independent order
        json.dump(sorted(results, key=lambda r: (r["image_id"], -r["score"], r["bbox"])), f)
    return score(gt, results, *a, **k)

main_detection.coco_evaluate = watched
run_main(lambda: main_detection.main(main_detection.parse_args()))
"""


def scoring(path: Path, seconds: float = 0) -> Path:
    """main_detection.py whose rank 0 scores ``seconds`` late once and dumps what it scores to path.json."""
    path.write_text(SCORING.format(seconds=seconds, dump=str(path.with_suffix(".json"))))
    return path


def test_detection_two_ranks_log_one_process_losses_and_evaluate_identically(tmp_path):
    """The first step sees the same images with the same augmentation and the same weights in both
    runs, so its classification loss (QFL summed / positives averaged over ranks) must equal the
    one-process value; the logged terms are means over ranks, not sums. The GIoU and DFL terms are
    divided by the rank-mean of the positives' scores clamped at 1, as mmdet's GFL head: while those
    scores sum to less than 1 per rank (untrained toy models) 2 ranks and 1 process normalise them
    differently, so they and the weights after the step are not compared.

    Rank 0 scores epoch 0's evaluation alone for 10 s more, past --dist_timeout (6 s): rank 1 waits
    for it in a barrier with its own long timeout, not in epoch 1's first collective."""
    coco = make_tiny_coco(tmp_path / "coco", n_train=4, n_val=3, size=64)
    val = coco / "annotations" / "instances_val2017.json"
    gt = json.loads(val.read_text())  # large boxes: untrained GFL boxes (about 16 strides) then score
    gt["annotations"] += [{"id": 500 + k, "image_id": im["id"], "category_id": 1 + k % 3, "iscrowd": 0,
                           "bbox": [1, 2, im["width"] - 3, im["height"] - 4], "area": 1}
                          for k, im in enumerate(gt["images"])]
    val.write_text(json.dumps(gt))
    common = DET + ["--data_path", coco, "--epochs", "2"]
    launch(scoring(tmp_path / "slow.py", seconds=10),
           common + ["--batch_size", "2", "--dist_timeout", "0.1", "--output_dir", tmp_path / "ddp"], ranks=2)
    launch("main_detection.py", common + ["--batch_size", "4", "--output_dir", tmp_path / "one"], ranks=1)
    ddp, one = (json.loads((tmp_path / d / "log.txt").read_text().splitlines()[0]) for d in ("ddp", "one"))
    assert one["train_loss_cls"] > 0
    assert ddp["train_loss_cls"] == pytest.approx(one["train_loss_cls"], rel=1e-4)

    # Evaluation runs one image per forward on every rank, so the gathered detections, and all 12 COCO
    # numbers, are identical at 2 ranks with --batch_size 2 and at one process with --batch_size 1.
    ckpt = tmp_path / "one" / "checkpoint-last.pth"
    for ranks, batch, out in ((2, 2, "ev2"), (1, 1, "ev1")):
        launch(scoring(tmp_path / f"{out}.py"), DET + ["--data_path", coco, "--eval", "--resume", ckpt, "--batch_size",
                                                      batch, "--score_thr", "0", "--output_dir", tmp_path / out],
               ranks=ranks)
    ev2, ev1 = (json.loads((tmp_path / o / "eval.json").read_text()) for o in ("ev2", "ev1"))
    assert ev1["bbox"]["AR100"] > 0 and ev2["bbox"] == ev1["bbox"] and len(ev1["bbox"]) == 12
    det2, det1 = (json.loads((tmp_path / f"{o}.json").read_text()) for o in ("ev2", "ev1"))
    assert len(det1) > 0 and det2 == det1


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
