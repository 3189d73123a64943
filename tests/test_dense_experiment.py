"""The dense-transfer experiment: exact scenes from real silhouettes, and the driver's smoke run."""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.dense_experiment import smoke_config
from tools.make_dense_scenes import SceneSpec, silhouette_pools, write_scenes
from imagedata.animal_mnist import load_animal_mnist, split_indices

ROOT = Path(__file__).resolve().parents[1]
TINY = SceneSpec(n_train=6, n_dev=3, n_test=3, min_size=40, max_size=72, min_object=16, max_object=36,
                 max_objects=3, per_class=3)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), TINY)


def test_boxes_masks_and_label_maps_are_exact(scenes):
    from pycocotools import mask as mask_utils
    for held in ("dev", "test"):
        for sub, ade in (("train", "training"), ("val", "validation")):
            coco = json.loads((scenes / f"coco_{held}" / "annotations" / f"instances_{sub}2017.json").read_text())
            assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
            by_image = {im["id"]: [] for im in coco["images"]}
            for a in coco["annotations"]:
                by_image[a["image_id"]].append(a)
            for im in coco["images"]:
                img = Image.open(scenes / f"coco_{held}" / f"{sub}2017" / im["file_name"])
                w, h = img.size
                assert (w, h) == (im["width"], im["height"]) and 40 <= w <= 72 and 40 <= h <= 72
                assert by_image[im["id"]], "every scene holds an animal"
                union = np.zeros((h, w), np.int64)
                for a in by_image[im["id"]]:
                    m = mask_utils.decode(a["segmentation"]).astype(bool)
                    ys, xs = np.nonzero(m)
                    assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                    assert a["area"] == m.sum() >= 16 and a["iscrowd"] == 0
                    assert not (union[m] > 0).any(), "instance masks overlap"
                    union[m] = a["category_id"]
                stem = f"scene_{'train' if sub == 'train' else held}_{Path(im['file_name']).stem}"
                label = np.asarray(Image.open(scenes / f"ade_{held}" / "annotations" / ade / f"{stem}.png"))
                np.testing.assert_array_equal(label, union)  # 0 = background, k + 1 = class k
                assert (scenes / f"ade_{held}" / "images" / ade / f"{stem}.png").is_file()


def test_test_silhouettes_never_in_pretraining_and_pools_disjoint(scenes):
    _, labels = load_animal_mnist()
    pools = silhouette_pools(labels, TINY)
    assert set(pools["test"]) <= set(split_indices(labels, seed=0)["test"])
    assert not set(pools["test"]) & set(pools["train"]) and not set(pools["dev"]) & set(pools["train"])
    meta = json.loads((scenes / "scenes.json").read_text())
    pretrained = {int(p.stem) for p in (scenes / "pretrain" / "train").rglob("*.png")}
    assert pretrained == set(pools["train"])
    assert set(meta["silhouettes_used"]["train"]) <= pretrained
    for held in ("dev", "test"):
        assert meta["silhouettes_used"][held] and not set(meta["silhouettes_used"][held]) & pretrained
    assert {int(p.stem) for p in (scenes / "classify" / "val").rglob("*.png")} == set(pools["dev"])
    img = Image.open(next((scenes / "pretrain" / "train").rglob("*.png")))
    assert img.size == (32, 32) and img.mode == "RGB"
    # the dense experiment pretrains on the train scenes, unlabelled (one folder of the train scenes)
    linked = sorted(p.name for p in (scenes / "pretrain_scenes" / "train" / "scene").glob("*.png"))
    assert linked == sorted(p.name for p in (scenes / "scenes" / "train").glob("*.png")) and len(linked) == TINY.n_train


def test_fixed_seed_reuse_and_rewrite(scenes, tmp_path):
    again = write_scenes(tmp_path / "again", TINY)
    for rel in ("scenes/test/000001.png", "scenes/train_labels/000003.png", "coco_test/annotations/instances_val2017.json"):
        assert (again / rel).read_bytes() == (scenes / rel).read_bytes()
    stamp = (again / "scenes" / "train" / "000001.png").stat().st_mtime_ns
    write_scenes(again, TINY)                               # same settings: reused, not rewritten
    assert (again / "scenes" / "train" / "000001.png").stat().st_mtime_ns == stamp
    other = SceneSpec(**{**TINY.__dict__, "n_test": 2, "seed": 1})
    write_scenes(again, other)                              # other settings: rewritten from scratch
    assert len(list((again / "scenes" / "test").glob("*.png"))) == 2
    assert (again / "scenes" / "test" / "000001.png").read_bytes() != (scenes / "scenes" / "test" / "000001.png").read_bytes()


def test_scheduler_waits_for_dependencies_and_fails_dependants_only():
    from tools.dense_experiment import Job, run_jobs
    order, lock = [], threading.Lock()

    def step(name, fail=False):
        def run():
            time.sleep(0.05)
            with lock:
                order.append(name)
            if fail:
                raise RuntimeError(f"{name} broke")
            return {"name": name}
        return run
    jobs = [Job(("b",), step("b"), deps=(("a",),)), Job(("a",), step("a")), Job(("c",), step("c", fail=True)),
            Job(("d",), step("d"), deps=(("c",),)), Job(("e",), step("e"), deps=(("b",),))]
    with pytest.raises(RuntimeError) as err:
        run_jobs(jobs, workers=2)
    assert order.index("a") < order.index("b") < order.index("e") and "d" not in order
    assert "('c',): c broke" in str(err.value) and "('d',): needs [('c',)]" in str(err.value)


def test_a_run_that_stopped_early_is_an_error_not_a_result(scenes, tmp_path):
    """A program stopped before the end of its schedule (here --exit_after_epoch; a SIGTERM does the
    same) exits 0 with a checkpoint and a log.txt line holding a mid-training mIoU: the driver must
    read the run record's status and refuse it, then rerun the run from a clean folder and reuse it
    once completed."""
    from tools.dense_experiment import _reuse_or_run, seg_job
    cfg = smoke_config(tmp_path)
    cfg.scenes = TINY
    (tmp_path / "data").symlink_to(scenes)
    job = seg_job(cfg, "test", "pvt", "scratch", 0)
    stopped = [*job.command, "--iters", "4", "--eval_interval", "2", "--exit_after_epoch", "0"]
    with pytest.raises(RuntimeError, match="status 'stopped'|not 'completed'"):
        _reuse_or_run(job.out, stopped, threads=1)
    assert '"whole_mIoU"' in (job.out / "log.txt").read_text()  # what a log.txt reader would have taken
    result = job.run()                                           # the real command: rerun, completes
    assert 0 <= result["mIoU"] <= 100 and result["steps"] == cfg.seg.steps
    assert sorted(p.name for p in job.out.glob("run-*.json")) == ["run-001.json"]  # a clean folder
    stamp = (job.out / "time.json").stat().st_mtime_ns
    assert job.run()["mIoU"] == result["mIoU"] and (job.out / "time.json").stat().st_mtime_ns == stamp  # reused


FAKE_PROGRAM = """
import json, pathlib, sys, time
out, release = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with open(out.parent / "starts.txt", "a") as f:
    f.write("start\\n")
while not release.exists():
    time.sleep(0.02)
out.mkdir(parents=True, exist_ok=True)
(out / "run-001.json").write_text(json.dumps({"finished": {"status": "completed"}}))
"""


def test_two_invocations_share_a_run_instead_of_wiping_it(tmp_path):
    """A dev check and the table both need the same pretraining: while the first invocation runs
    it, the second waits on the lock and then reuses it (one start, not two)."""
    from tools.dense_experiment import _reuse_or_run
    out, release = tmp_path / "runs" / "pretrain", tmp_path / "release"
    cmd = [sys.executable, "-c", FAKE_PROGRAM, str(out), str(release)]
    results = []
    threads = [threading.Thread(target=lambda: results.append(_reuse_or_run(out, cmd, threads=1))) for _ in range(2)]
    threads[0].start()
    while not (tmp_path / "runs" / "starts.txt").exists():
        time.sleep(0.02)
    threads[1].start()
    time.sleep(1.0)                         # time for a second start, if the lock did not hold it
    release.write_text("go")
    for t in threads:
        t.join(60)
    assert (tmp_path / "runs" / "starts.txt").read_text().count("start") == 1
    assert len(results) == 2 and results[0] == results[1] and results[0]["returncode"] == 0


def test_dense_smoke_end_to_end(tmp_path, monkeypatch):
    """tools/dense_experiment.py --smoke on PVT: scenes, UM-MAE pretraining on the unlabelled train
    scenes, GFL and UperNet from scratch and from the pretrained encoder, as the real programs;
    results.json, the figure and every metric finite; then a dev check that reuses the pretraining
    and evaluates on the dev scenes. (Not accuracy: 2 steps on 8 scenes.) Seven program runs of
    about 5 CPU-s each, two side by side."""
    out = tmp_path / "dense"
    base = [sys.executable, "tools/dense_experiment.py", "--smoke", "--out", str(out), "--backbones", "pvt"]
    proc = subprocess.run(base + ["--inits", "scratch", "ummae"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["arms"]) == {"scratch_pvt", "ummae_pvt"} and res["phase"] == "test"
    for name, row in res["arms"].items():
        assert 0 <= row["det"]["mean"] <= 100 and 0 <= row["seg"]["mean"] <= 100, name
        assert row["det"]["cpu_s"][0] > 0 and row["seg"]["wall_s"][0] > 0
    assert res["arms"]["ummae_pvt"]["pretrain"]["cpu_s"] > 0
    pre_cmd = json.loads((out / "pretrain" / "ummae_pvt" / "time.json").read_text())["command"]
    assert f"--data_path {out / 'data' / 'pretrain_scenes'} " in pre_cmd and "mae_pvt_pico_128" in pre_cmd
    assert set(res["gains"]["pvt"]["ummae_vs_scratch"]) == {"det", "seg"}
    for task in ("det", "seg"):
        log = (out / "test" / task / "ummae_pvt_seed0" / "stdout.txt").read_text()
        assert "loaded" in log and "pretrain/ummae_pvt/checkpoint-last.pth" in log
        cmd = json.loads((out / "test" / task / "scratch_pvt_seed0" / "time.json").read_text())["command"]
        assert f"{out / 'data' / ('coco_test' if task == 'det' else 'ade_test')} " in cmd and "--finetune" not in cmd
    assert (out / "dense_vs_pretrain_time.png").stat().st_size > 1000 and res["partial"] is False

    # --partial starts nothing: the finished seed 0 tabulated again, seed 1 listed as missing
    proc = subprocess.run(base + ["--inits", "scratch", "ummae", "--seeds", "0", "1", "--partial"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "PARTIAL TABLE: 4 runs missing" in proc.stdout, proc.stdout + proc.stderr
    part = json.loads((out / "results.json").read_text())
    assert part["partial"] and ["det", "test", "pvt", "ummae", 1] in part["missing"]
    assert part["arms"]["ummae_pvt"]["seg"]["runs"] == res["arms"]["ummae_pvt"]["seg"]["runs"]
    assert not (out / "test" / "det" / "scratch_pvt_seed1").exists()

    pre_time = (out / "pretrain" / "ummae_pvt" / "time.json").read_text()
    proc = subprocess.run(base + ["--inits", "ummae", "--phase", "dev", "--tag", "t1", "--det_lr", "5e-4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "pretrain" / "ummae_pvt" / "time.json").read_text() == pre_time  # reused, not rerun
    rec = json.loads((out / "dev_results.jsonl").read_text().splitlines()[-1])
    assert rec["phase"] == "dev" and rec["setup"]["tag"] == "t1" and rec["setup"]["det"]["lr"] == 5e-4
    cmd = json.loads((out / "dev" / "det" / "ummae_pvt_t1_seed0" / "time.json").read_text())["command"]
    assert f"--data_path {out / 'data' / 'coco_dev'} " in cmd and "--lr 0.0005" in cmd

    # the dev-split diagnosis reads the finished test-phase runs: every run, its numbers in range
    proc = subprocess.run([sys.executable, "tools/dense_diagnosis.py", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    diag = json.loads((out / "diagnosis.json").read_text())
    assert (out / "diagnosis.png").stat().st_size > 1000
    assert diag["split"] == "dev"
    assert sorted((r["task"], r["init"]) for r in diag["runs"]) == [("det", "scratch"), ("det", "ummae"),
                                                                    ("seg", "scratch"), ("seg", "ummae")]
    for r in diag["runs"]:
        keys = ("AP", "agnostic_AP", "agnostic_AP50") if r["task"] == "det" else ("mIoU", "fg_IoU", "animal_acc_on_fg")
        assert all(0 <= r[k] <= 100 for k in keys) and r["images"] == smoke_config(out).scenes.n_dev, r
    # a second invocation reuses each run's row, kept beside its weights
    assert all((out / "test" / r["task"] / f"{r['init']}_pvt_seed0" / "diagnosis_dev.json").is_file() for r in diag["runs"])
    import tools.dense_diagnosis as dd

    def recompute(*_):
        raise AssertionError("a finished run's diagnosis was computed again")
    monkeypatch.setattr(dd, "DIAGNOSE", {t: (recompute, data) for t, (_, data) in dd.DIAGNOSE.items()})
    assert dd.diagnose(out, log=lambda *_: None)["runs"] == diag["runs"]


def test_foreground_found_while_the_argmax_says_background():
    """The segmentation diagnosis separates finding an animal from naming it: a pixel whose animal
    probability (0.6) is split over two classes is found, though its argmax is the background (0.4)."""
    import torch
    from tools.dense_diagnosis import foreground_counts
    label = torch.tensor([[0, 1, 2, 255]])
    probs = torch.tensor([[0.9, 0.4, 0.4, 0.1],      # background
                          [0.05, 0.35, 0.1, 0.8],    # animal 1
                          [0.05, 0.25, 0.5, 0.1]])   # animal 2
    logits = probs.log()[:, None, :]
    assert logits.argmax(0).tolist() == [[0, 0, 2, 1]]
    # found and named: pixels 1 and 2 (the ignored pixel 3 is left out), though pixel 1's argmax is background
    assert foreground_counts(logits, label) == (2, 2, 2, 2)
