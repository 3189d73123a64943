"""The animal-mnist data path (safe unpickling, fixed split) and the experiment tool's smoke run."""
import gzip
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imagedata.animal_mnist import UnsafePickleError, load_array, load_animal_mnist, split_indices, write_split

ROOT = Path(__file__).resolve().parents[1]


def _gz(path: Path, payload: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(payload)
    return path


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_arrays_round_trip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(load_array(_gz(tmp_path / "a.gz", pickle.dumps(a))), a)


def test_tampered_file_is_refused_before_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = _gz(tmp_path / "bad.gz", pickle.dumps(_RunsCode()))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        load_array(bad)
    assert not (tmp_path / "PWNED").exists()
    # an array payload with a code-running object appended to a list is refused too
    mixed = _gz(tmp_path / "mixed.gz", pickle.dumps([np.zeros(3, np.uint8), _RunsCode()]))
    with pytest.raises(UnsafePickleError):
        load_array(mixed)
    assert not (tmp_path / "PWNED").exists()
    objects = _gz(tmp_path / "obj.gz", pickle.dumps(np.array([{"a": 1}], dtype=object)))
    with pytest.raises(UnsafePickleError):
        load_array(objects)


def test_split_is_fixed_stratified_and_disjoint():
    _, y = load_animal_mnist()
    s = split_indices(y, seed=0)
    assert len(s["pretrain"]) == 8000 and len(s["test"]) == 2000
    assert not set(s["pretrain"]) & set(s["test"])
    assert set(s["l10"]) <= set(s["l50"]) <= set(s["l200"]) <= set(s["pretrain"])
    for n in (10, 50, 200):
        assert np.bincount(y[s[f"l{n}"]], minlength=10).tolist() == [n] * 10
    assert split_indices(y, seed=0) == s


def test_written_folders(tmp_path):
    root = write_split(tmp_path / "am", budgets=(1, 2, 3), pretrain_per_class=4, test_per_class=3)
    count = lambda d: sum(1 for _ in (root / d).rglob("*.png"))
    assert count("pretrain/train") == 40 and count("test") == 30 and count("l1/train") == 10
    assert count("l3/train") == 30 and count("l3/val") == 30 and count("dev/train") == 20 and count("dev/val") == 10
    names = lambda d: {p.name for p in (root / d).rglob("*.png")}
    assert not names("pretrain/train") & names("test")
    assert json.loads((root / "split.json").read_text())["size"] == 32
    from PIL import Image
    img = Image.open(next((root / "test").rglob("*.png")))
    assert img.size == (32, 32) and img.mode == "RGB"


def test_experiment_smoke_end_to_end(tmp_path):
    """tools/experiment.py --smoke on two arms: pretraining, k-NN, linear probe and finetuning run as the
    real programs; results.json and both figures are written and every metric is finite.
    (Not accuracy: one pretraining epoch on 40 images.) Nine program runs of about 6.5 CPU-s each
    (mostly start-up), two side by side: about 30-35 s on an idle 2-core machine."""
    out = tmp_path / "exp"
    proc = subprocess.run([sys.executable, "tools/experiment.py", "--smoke", "--out", str(out),
                           "--arms", "scratch_swin", "ummae_swin"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["arms"]) == {"scratch_swin", "ummae_swin"}
    for name, row in res["arms"].items():
        for metric in ("knn", "linprobe"):
            assert np.isfinite(row[metric]) and 0 <= row[metric] <= 100, (name, metric)
        assert set(row["finetune"]) == ({"l2", "l4", "l6"} if name in ("scratch_swin", "ummae_swin") else {"l4"})
        assert all(np.isfinite(v["mean"]) for v in row["finetune"].values())
    pre = res["arms"]["ummae_swin"]
    assert pre["pretrain_cpu_s"] > 0 and pre["pretrain_wall_s"] > 0 and np.isfinite(pre["pretrain_loss"]).all()
    assert "loaded" in (out / "eval" / "ummae_swin" / "finetune_l4_seed0" / "stdout.txt").read_text()
    for png in ("top1_vs_labels.png", "top1_vs_pretrain_time.png"):
        assert (out / png).stat().st_size > 1000

    # the dev phase reuses the pretraining, validates on dev/val (carved out of labelled training
    # images) and appends one record per recipe variant
    pre_time = (out / "pretrain" / "ummae_swin" / "time.json").read_text()
    proc = subprocess.run([sys.executable, "tools/experiment.py", "--smoke", "--out", str(out), "--phase", "dev",
                           "--arms", "ummae_swin", "--tag", "t1", "--blr", "1e-3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "pretrain" / "ummae_swin" / "time.json").read_text() == pre_time  # reused, not rerun
    rec = json.loads((out / "dev_results.jsonl").read_text().splitlines()[-1])
    assert rec["tag"] == "t1" and rec["recipe"]["blr"] == 1e-3
    assert np.isfinite(rec["arms"]["ummae_swin"]["finetune_dev"]["mean"])
    cmd = json.loads((out / "eval" / "ummae_swin" / "finetune_dev_t1_seed0" / "time.json").read_text())["command"]
    assert f"--data_path {out / 'data' / 'dev'} " in cmd and "--blr 0.001" in cmd

    # the monitor phase: the monitored pretraining beside the table's (reused) as its control; the
    # monitor's last k-NN against the offline k-NN of the final checkpoint on the monitor's own split
    proc = subprocess.run([sys.executable, "tools/experiment.py", "--smoke", "--out", str(out), "--phase", "monitor"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "pretrain" / "ummae_swin" / "time.json").read_text() == pre_time
    row = json.loads((out / "monitor.json").read_text())["arms"]["ummae_swin"]
    assert "--monitor_data " + str(out / "data" / "l4" / "train") in row["pretrain_command"]
    assert row["control"]["same_final_weights"] and row["monitor_points"] == 1
    assert abs(row["final_monitor_knn"] - row["offline_knn_same_split"]) < 100 / 10 + 1e-9   # one of 10 queries
    assert 0 < row["monitor_s"] < row["pretrain_wall_s"] and (out / "monitor_ummae_swin.png").stat().st_size > 1000
    from engine.monitor import split_monitor_set
    train, val = split_monitor_set(str(out / "data" / "l4" / "train"), 0)
    written = out / "data" / "monitor_l4"
    for split, images in (("train", train), ("val", val)):
        assert sorted((Path(p).name, images.classes[c]) for p, c in images.samples) == sorted(
            (f.name, f.parent.name) for f in (written / split).rglob("*.png"))


def test_merge_adds_arms_and_refuses_another_recipe():
    from tools.experiment import merge_results
    setup = {"out": "/a", "jobs": 2, "blr": 0.016, "seeds": [0, 1, 2]}
    prior = {"arms": {"scratch_swin": {"knn": 1.0}, "ummae_swin": {"knn": 2.0}}, "setup": setup,
             "total_wall_s": 100.0, "command": "first"}
    new = {"arms": {"mixmae_mixmim3": {"knn": 3.0}, "ummae_swin": {"knn": 9.0}}, "setup": {**setup, "out": "/b", "seeds": (0, 1, 2)},
           "total_wall_s": 50.0, "command": "second", "hardware": {"cpus": 2}}
    m = merge_results(prior, new)
    assert m["arms"] == {"scratch_swin": {"knn": 1.0}, "ummae_swin": {"knn": 9.0}, "mixmae_mixmim3": {"knn": 3.0}}
    assert m["total_wall_s"] == 150.0 and m["command"] == "first"
    assert m["invocations"] == [{"command": "second", "arms": ["mixmae_mixmim3", "ummae_swin"], "wall_s": 50.0,
                                 "hardware": {"cpus": 2}}]
    assert prior["arms"]["ummae_swin"] == {"knn": 2.0}                        # the earlier table is not modified
    with pytest.raises(SystemExit, match="blr"):
        merge_results(prior, {**new, "setup": {**setup, "blr": 0.001}})


@pytest.mark.parametrize("flags, message", [(["--eval_freq", "0"], "--eval_freq"),
                                            (["--min_crop_scale", "0"], "--min_crop_scale")])
def test_new_finetune_flags_are_validated(tmp_path, flags, message):
    import main_finetune
    from errors import UsageError
    with pytest.raises(UsageError, match=message):
        main_finetune.parse_args(["--model", "swin_pico_p1_32", "--data_path", str(tmp_path), "--device", "cpu",
                                  "--output_dir", str(tmp_path / "o"), *flags])
