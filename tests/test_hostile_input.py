"""Hostile and sloppy input: checkpoints that cannot exhaust memory or time, flags that fail before
any work, images that are neither silently damaged nor silently dropped."""
import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_finetune
import main_pretrain
from programs import ROOT
from engine import safe_archive
from errors import CheckpointError
from engine.checkpoint import safe_load
from errors import UsageError
from imagedata.images import to_rgb8
from imagedata.datasets import ImageList, image_list, report_left_out, walk_images

PY = sys.executable
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------- checkpoints

PROBE = textwrap.dedent("""
    import argparse, json, resource, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    import hostile_files as H
    from pathlib import Path
    from errors import CheckpointError
    from engine.checkpoint import safe_load
    from engine.state import resume_training_state
    d = Path({tmp!r})
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    cases = {{
        "bytearray": H.bytearray_bomb(d / "bytearray.pth", 1 << 30),
        "FloatTensor": H.tensor_class_bomb(d / "floattensor.pth", 1 << 28),
        "deflate": H.deflate_bomb(d / "deflate.pth", 1 << 28),
        "raw_pickle": H.raw_pickle(d / "raw.pkl"),
        "odd_namespace": H.odd_namespace(d / "ns.pth"),
        "namespace_keys": H.odd_namespace_keys(d / "nskeys.pth"),
        "optimizer_expansion": H.optimizer_expansion(d / "expand.pth", model, opt),
    }}
    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for name, path in cases.items():
        base, t = rss(), time.perf_counter()
        try:
            if name == "optimizer_expansion":  # the route users take: --resume
                args = argparse.Namespace(resume=str(path), auto_resume=False, start_epoch=0, output_dir=str(d))
                resume_training_state(args, model, opt, None, log=lambda *a, **k: None)
            else:
                safe_load(path)
            msg, ok = "", False
        except CheckpointError as e:
            msg, ok = str(e), True
        print(json.dumps(dict(case=name, refused=ok, message=msg, size=path.stat().st_size,
                              seconds=time.perf_counter() - t, rss_delta=rss() - base)), flush=True)
""")


def test_hostile_checkpoints_are_refused_in_bounded_memory_and_time(tmp_path):
    """Each crafted file is a few KB (deflate: 0.26 MB) and, before this check, took 256 MB - 1 GB of
    memory (or never finished); refused now, each in < 10 s with < 100 MB of peak memory."""
    script = PROBE.format(root=str(ROOT), tests=str(TESTS), tmp=str(tmp_path))
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["case"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert len(rows) == 7
    for name, r in rows.items():
        assert r["refused"], name
        assert r["rss_delta"] < 100 * 2 ** 20, (name, r["rss_delta"])
        assert r["seconds"] < 10, (name, r["seconds"])
        assert "\n" not in r["message"] and "weights_only" not in r["message"]
        assert str(tmp_path) in r["message"], r["message"]
    assert "builtins.bytearray" in rows["bytearray"]["message"]
    assert "torch.FloatTensor" in rows["FloatTensor"]["message"]
    assert "compressed (deflate" in rows["deflate"]["message"]
    assert "raw pickle" in rows["raw_pickle"]["message"]
    assert "malformed: TypeError" in rows["odd_namespace"]["message"]
    assert "not identifiers" in rows["namespace_keys"]["message"]
    assert "expand to over" in rows["optimizer_expansion"]["message"]


def test_optimizer_state_is_checked_against_the_parameter_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[1].parameters()), "weight_decay": 0}]
    opt = torch.optim.AdamW(groups)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    good = opt.state_dict()
    safe_archive.check_optimizer_state(good, opt, "ok.pth")  # our own layout passes
    one_group = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(CheckpointError, match="has 1 parameter groups, this run's optimizer 2"):
        safe_archive.check_optimizer_state(one_group, opt, "x.pth")
    bad = {"state": good["state"], "param_groups": [dict(good["param_groups"][0], params=[0]),
                                                    good["param_groups"][1]]}
    with pytest.raises(CheckpointError, match="group 0 has 1 parameters, this run's 2"):
        safe_archive.check_optimizer_state(bad, opt, "x.pth")
    shaped = {"state": {0: {"exp_avg": torch.zeros(5, 5), "step": torch.tensor(1.0)}},
              "param_groups": good["param_groups"]}
    with pytest.raises(CheckpointError, match=r"exp_avg.*shape \(5, 5\), the parameter \(3, 4\)"):
        safe_archive.check_optimizer_state(shaped, opt, "x.pth")
    nested = {"state": {0: {"exp_avg": [[0.0]] * 3}}, "param_groups": good["param_groups"]}
    with pytest.raises(CheckpointError, match="neither a tensor nor a plain value"):
        safe_archive.check_optimizer_state(nested, opt, "x.pth")


def test_size_limit_scales_with_the_model_and_the_flag_overrides_it(tmp_path):
    model = torch.nn.Linear(1000, 1000)  # 4 MB of fp32 weights -> the 256 MB floor
    path = tmp_path / "ok.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1, model="x")}, path)
    try:
        safe_archive.expect_model(model)
        limit, why = safe_archive.limit_bytes()
        assert limit == 256 * 2 ** 20 and "8x the model's 4 MB" in why
        assert safe_archive.limit_bytes(100 * 2 ** 20)[0] == 800 * 2 ** 20
        assert set(safe_load(path)["model"]) == {"weight", "bias"}
        safe_archive.configure(0.001)  # --max_checkpoint_gb 0.001: 1 MB
        with pytest.raises(CheckpointError, match=r"ok.pth: entry .* holds 3.8 MB, over the limit of 1.0 MB "
                                                  r"\(--max_checkpoint_gb 0.001\)"):
            safe_load(path)
    finally:
        safe_archive.configure(None)
        safe_archive._expected_bytes = None


def test_a_cyclic_or_deep_structure_is_refused(tmp_path):
    loop: list = []
    loop.append(loop)
    torch.save({"model": {}, "x": loop}, tmp_path / "cycle.pth")
    with pytest.raises(CheckpointError, match="contains itself"):
        safe_load(tmp_path / "cycle.pth")
    deep: list = []
    for _ in range(200):
        deep = [deep]
    torch.save({"model": {}, "x": deep}, tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match="nested deeper than 64"):
        safe_load(tmp_path / "deep.pth")


# ----------------------------------------------------------------------------------- flags

def _labelled(root: Path) -> Path:
    for split in ("train", "val"):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (80 * c, 40, 40 + i)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return _labelled(tmp_path_factory.mktemp("flags"))


PT = ["--model", "mae_swin_pico_128", "--mask_regular", "--device", "cpu", "--log_dir", ""]
FT = ["--model", "swin_pico_128", "--nb_classes", "3", "--device", "cpu", "--log_dir", ""]

# (program, extra flags, text the one-line message must contain)
WRONG = [
    ("pt", ["--clip_grad", "-1"], "--clip_grad -1.0: valid values are a finite number >= 0"),
    ("ft", ["--clip_grad", "nan"], "--clip_grad nan"),
    ("ft", ["--layer_decay", "-1"], "--layer_decay -1.0: valid values are a number in (0, 1]"),
    ("ft", ["--layer_decay", "1.5"], "--layer_decay 1.5"),
    ("ft", ["--weight_decay", "-1"], "--weight_decay -1.0: valid values are a finite number >= 0"),
    ("pt", ["--weight_decay", "-0.05"], "--weight_decay -0.05"),
    ("pt", ["--warmup_epochs", "-5"], "--warmup_epochs -5: valid values are an integer >= 0"),
    ("ft", ["--warmup_epochs", "-1"], "--warmup_epochs -1"),
    ("pt", ["--lr", "-1"], "--lr -1.0: valid values are a finite number > 0"),
    ("ft", ["--lr", "0"], "--lr 0.0"),
    ("pt", ["--blr", "nan"], "--blr nan: valid values are a finite number > 0"),
    ("ft", ["--blr", "inf"], "--blr inf"),
    ("pt", ["--num_workers", "-1"], "--num_workers -1: valid values are an integer >= 0"),
    ("ft", ["--num_workers", "-2"], "--num_workers -2"),
    ("ft", ["--aa", "bogus"], "--aa 'bogus' is not a timm augmentation policy"),
    ("ft", ["--aa", "rand-bogus"], "section 'bogus' means nothing to timm's parser"),
    ("ft", ["--aa", "rand-m9-x3"], "--aa 'rand-m9-x3' is not a timm augmentation policy"),
    ("ft", ["--smoothing", "2"], "--smoothing 2.0: valid values are a number in [0, 1)"),
    ("ft", ["--smoothing", "1"], "--smoothing 1.0"),
    ("pt", ["--resume", "/missing.pth"], "--resume /missing.pth does not exist"),
    ("ft", ["--resume", "/missing.pth"], "--resume /missing.pth does not exist"),
    ("ft", ["--finetune", "/missing.pth"], "--finetune /missing.pth does not exist"),
    ("pt", ["--load_from", "/missing.pth"], "--load_from /missing.pth does not exist"),
    ("ft", ["--finetune", "/tmp"], "--finetune /tmp is a folder"),
    ("ft", ["--drop_path", "1.5"], "--drop_path 1.5: valid values are a number in [0, 1)"),
    ("ft", ["--reprob", "1.5"], "--reprob 1.5: valid values are a number in [0, 1]"),
    ("ft", ["--mixup", "-1"], "--mixup -1.0"),
    ("ft", ["--cutmix_minmax", "0.8", "0.2"], "min < max"),
    ("ft", ["--cutmix_minmax", "0.2", "1.5"], "--cutmix_minmax 0.2 1.5"),
    ("ft", ["--mixup_prob", "2"], "--mixup_prob 2.0"),
    ("pt", ["--min_lr", "-1"], "--min_lr -1.0"),
    ("pt", ["--batch_size", "0"], "--batch_size 0"),
    ("ft", ["--epochs", "0"], "--epochs 0"),
    ("ft", ["--accum_iter", "0"], "--accum_iter 0"),
    ("pt", ["--print_freq", "0"], "--print_freq 0: valid values are an integer >= 1"),
    ("pt", ["--save_freq", "-1"], "--save_freq -1"),
    ("ft", ["--keep_last", "-1"], "--keep_last -1"),
    ("pt", ["--dist_timeout", "0"], "--dist_timeout 0.0"),
    ("ft", ["--max_checkpoint_gb", "0"], "--max_checkpoint_gb 0.0"),
    ("ft", ["--remode", "bogus"], "--remode 'bogus': valid choices are pixel, rand, const"),
    ("ft", ["--recount", "0"], "--recount 0"),
    ("ft", ["--nb_classes", "0"], "--nb_classes 0"),
    ("pt", ["--mask_ratio", "0.5"], "--mask_ratio must be 0.75"),
    ("pt", ["--vis_mask_ratio", "1"], "--vis_mask_ratio must be in [0, 1)"),
    ("pt", ["--model", "bogus"], "unknown --model 'bogus'; valid pretraining models:"),
    ("ft", ["--data_path", "/missing"], "--data_path /missing does not exist"),
    ("ft", ["--knn", "--knn_t", "0"], "--knn_t 0.0"),
    ("ft", ["--color_jitter", "-0.4"], "--color_jitter -0.4"),
    ("pt", ["--vis_freq", "-1"], "--vis_freq -1"),
    ("ft", ["--start_epoch", "-1"], "--start_epoch -1"),
    ("pt", ["--exit_after_epoch", "-2"], "--exit_after_epoch -2"),
    ("ft", ["--max_skipped", "-2"], "--max_skipped -2: valid values are an integer >= -1"),
    ("ft", ["--amp", "fp8"], "invalid choice: 'fp8'"),
    ("pt", ["--cpu_matmul", "mkl"], "invalid choice: 'mkl'"),
]


def test_every_wrong_flag_fails_in_one_line_before_any_work(labelled, tmp_path, capsys):
    """In-process parse + validate (what the programs run before building anything) for each row;
    the real-process route is checked below for a few rows."""
    assert len(WRONG) >= 30
    for prog, flags, expected in WRONG:
        argv = (PT if prog == "pt" else FT + ["--data_path", str(labelled)]) + \
            ["--output_dir", str(tmp_path / "out")] + flags
        parse = main_pretrain.parse_args if prog == "pt" else main_finetune.parse_args
        t = time.perf_counter()
        with pytest.raises((UsageError, SystemExit)) as info:
            parse(argv)
        elapsed = time.perf_counter() - t
        message = str(info.value) if info.type is UsageError else capsys.readouterr().err.strip().splitlines()[-1]
        assert expected in message, (flags, message)
        assert "\n" not in message and elapsed < 2.0, (flags, elapsed)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("program,flags,expected", [
    ("main_pretrain.py", PT + ["--clip_grad", "-1"], "--clip_grad -1.0: valid values"),
    ("main_finetune.py", FT + ["--aa", "bogus"], "--aa 'bogus' is not a timm augmentation policy"),
    ("main_linprobe.py", FT + ["--resume", "/missing.pth"], "--resume /missing.pth does not exist"),
])
def test_wrong_flags_in_a_real_run_are_one_line_without_traceback(labelled, tmp_path, program, flags, expected):
    if program != "main_pretrain.py":
        flags = flags + ["--data_path", str(labelled)]
    proc = subprocess.run([PY, str(ROOT / program), *flags, "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and expected in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "parameters" not in proc.stdout  # failed before building the model


# ----------------------------------------------------------------------------------- images

def test_16_bit_grey_gradient_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")          # 16-bit grey as PIL opens it
    img, _ = ImageList([(str(path), 0)]).load(0)
    got = np.asarray(img)
    assert img.mode == "RGB" and got.shape == (4, 256, 3)
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535)
    assert np.abs(got[..., 0] - expected).max() <= 0.5 and (got[..., 0] == got[..., 2]).all()
    assert (got == 255).mean() < 0.01                     # convert("RGB") gave ~99.6% white
    lin = np.linspace(0, 1, 11, dtype=np.float32)
    f = Image.fromarray(lin[None], "F")  # float images in [0, 1]
    assert np.asarray(to_rgb8(f))[0, :, 1].tolist() == np.rint(lin.astype(np.float64) * 255).tolist()


def test_every_left_out_file_is_named_once_with_its_reason(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for name in ("x.png", "y.jpg"):
        Image.new("RGB", (8, 8)).save(root / "a" / name)
    Image.new("RGB", (8, 8)).save(root / "a" / "anim.gif")
    (root / "a" / "broken.png").symlink_to(root / "nowhere.png")
    (root / "a" / "loop").symlink_to(root / "a")          # a folder loop
    (root / "self.png").symlink_to(root / "self.png")      # a link to itself
    (root / "locked").mkdir()
    Image.new("RGB", (8, 8)).save(root / "locked" / "z.png")
    real_scandir = os.scandir

    def scandir(path):  # the tests run as root, for whom chmod 000 does not lock a folder
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    images = image_list(str(root), "train", labelled=False)
    assert [Path(p).name for p, _ in images.samples] == ["x.png", "y.jpg"]
    reasons = {Path(p).name: r for p, r in images.left_out}
    assert reasons["anim.gif"] == "unsupported type (.gif)"
    assert reasons["broken.png"].startswith("broken symbolic link")
    assert reasons["self.png"] == "symbolic link loop"
    assert reasons["loop"].startswith("symbolic link loop")
    assert reasons["locked"] == "unreadable folder: Permission denied"
    lines = []
    report_left_out(images, log=lines.append)
    assert len(lines) == len(images.left_out) == 5 and len(set(lines)) == 5


def test_class_folders_keep_torchvision_order_and_name_what_they_leave_out(tmp_path):
    from torchvision import datasets
    root = tmp_path / "d"
    for rel in ("train/b/1.png", "train/b/sub/0.png", "train/b-x/2.png", "train/a/9.JPG", "train/a/0.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / rel, format="PNG")
    (root / "train" / "a" / "notes.txt").write_text("x")
    ours = image_list(str(root), "train", labelled=True)
    theirs = datasets.ImageFolder(str(root / "train"))
    assert ours.samples == theirs.samples and ours.classes == theirs.classes
    assert [Path(p).name for p, _ in ours.left_out] == ["notes.txt"]


def test_large_jpeg_is_decoded_at_reduced_scale_and_huge_images_are_named_once(tmp_path, monkeypatch):
    import imagedata.images as D
    big = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1600), (10, 200, 30)).save(big, quality=90)
    images = ImageList([(str(big), 0)])
    images.min_side = 380
    img, _ = images.load(0)
    assert img.size == (600, 400)  # draft at 1/4: both sides still >= 380
    images.min_side = 900
    assert images.load(0)[0].size == (2400, 1600)  # a 1/2 decode would be under what the crop needs
    png = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(png)
    monkeypatch.setattr(D, "HUGE_PIXELS", 50_000)
    huge = ImageList([(str(png), 0)])
    with pytest.warns(UserWarning, match=r"big.png is 300x300 .* decoded at full size") as rec:
        huge.load(0)
        huge.load(0)
    assert len([w for w in rec if "decoded at full size" in str(w.message)]) == 1


SUM_PROBE = textwrap.dedent("""
    import os, sys, argparse
    sys.path.insert(0, {root!r})
    import torch, torch.distributed as dist
    from engine.step import StepLoop, StepOutput, StepSettings
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = [torch.ones(1, 2)] * 3
    def compute(batch):  # rank 1 skips 2 images per step, rank 0 none
        return StepOutput(model(batch).sum(), 1, {{"skipped_images": 2 * rank}})
    loop = StepLoop(model, opt, None, torch.device("cpu"), StepSettings(print_every=100))
    stats = loop.run(loader, 0, 0, len(loader), compute, lambda step: 0.0, periods=1)
    print(rank, stats["skipped_images"], flush=True)
    from engine.distributed import cleanup
    cleanup()
""")


def test_skipped_image_counts_are_summed_over_ranks(tmp_path):
    script = SUM_PROBE.format(root=str(ROOT), store=str(tmp_path / "store"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([PY, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    assert sorted(o[0].split()[-1] for o in outs) == ["6", "6"]  # rank 1's 3 x 2, seen by both ranks


def test_protocol_4_zip_is_refused_without_torchs_unsafe_advice(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "p4.pth", pickle_protocol=4)
    with pytest.raises(CheckpointError) as info:
        safe_load(tmp_path / "p4.pth")
    message = str(info.value)
    assert "p4.pth" in message and "Unsupported operand" in message
    assert "weights_only" not in message and "\n" not in message
