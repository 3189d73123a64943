"""Tar-shard data sets: conversion, splitting over ranks and workers, seeded order, exact resume, training."""
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import pytest
import torch

import main_finetune
import main_pretrain
from test_finetune import make_labelled
from util.datasets import DataError, image_list, pretrain_transform
from util.shards import ShardStream, read_shard, scan_shard

ROOT = Path(__file__).resolve().parents[1]
PICO = ["--model", "mae_swin_pico_128", "--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss",
        "--print_freq", "1000", "--device", "cpu", "--log_dir", ""]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """27 labelled images (18 train, 9 val) -> shards of 5 samples."""
    root = tmp_path_factory.mktemp("shards")
    src = make_labelled(root / "src", per_class=6)
    (src / "train" / "class_1" / "notes.txt").write_text("not an image")
    out = root / "shards"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--data_path", str(src),
                        "--output_dir", str(out), "--shard_size", "5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "train: 18 images in 4 shards" in r.stdout and "val: 9 images in 2 shards" in r.stdout
    assert "notes.txt" in r.stdout + r.stderr  # left out, and named
    return out


def keys_of(stream: ShardStream, workers: int) -> list[list[str]]:
    """Batches of sample keys as a DataLoader with ``workers`` workers returns them (round-robin)."""
    per = [[[s["__url__"] + ":" + s["__key__"] for s, _ in b] for b in stream.worker_batches(w, workers)]
           for w in range(workers)]
    out = []
    for i in range(max(len(p) for p in per)):
        out += [p[i] for p in per if i < len(p)]
    return out


def stream(shards, batch=2, world=1, rank=0, seed=0, train=True, split="train"):
    images = image_list(str(shards), split, labelled=True)
    return ShardStream(images, pretrain_transform(32), batch, seed, train=train, world=world, rank=rank)


def test_index_matches_the_tar_headers_and_bad_specs_are_named(shards):
    index = json.loads((shards / "train.json").read_text())
    assert index["classes"] == ["class_0", "class_1", "class_2"]
    for s in index["shardlist"]:
        assert scan_shard(str(shards / s["url"]), labelled=True)[0] == s["nsamples"]
    pattern = str(shards / "train-{000000..000003}.tar")
    assert len(image_list(pattern, "train", labelled=False)) == 18
    assert len(image_list(str(shards / "{split}-{000000..000001}.tar"), "val", labelled=True)) == 9
    with pytest.raises(DataError, match="needs '{split}'"):
        image_list(pattern, "val", labelled=True)
    with pytest.raises(DataError, match="train-000004.tar does not exist"):
        image_list(str(shards / "train-{000003..000004}.tar"), "train", labelled=False)
    with pytest.raises(DataError, match=r"train-000008.tar does not exist \(2 missing\)"):
        image_list(str(shards / "train-{000008..000009}.tar"), "train", labelled=False)


def test_two_ranks_by_two_workers_read_disjoint_samples_in_equal_steps(shards):
    per_rank = [keys_of(stream(shards, batch=2, world=2, rank=r), 2) for r in range(2)]
    assert [len(b) for b in per_rank] == [4, 4]  # 9 images per rank -> 4 steps of 2 on each rank
    assert len(stream(shards, world=2, rank=0)) == 4
    flat = [k for batches in per_rank for b in batches for k in b]
    assert len(flat) == len(set(flat)) == 16
    # each rank's steps come from its two workers in turn, each reading its own part
    for rank in range(2):
        s = stream(shards, batch=2, world=2, rank=rank)
        w0 = {k for b in keys_of_worker(s, 0, 2) for k in b}
        w1 = {k for b in keys_of_worker(s, 1, 2) for k in b}
        assert w0 and w1 and not w0 & w1
    # evaluation: every sample exactly once across ranks, the last batch short
    ev = [keys_of(stream(shards, batch=2, world=2, rank=r, train=False, split="val"), 2) for r in range(2)]
    flat = [k for batches in ev for b in batches for k in b]
    assert len(flat) == len(set(flat)) == 9


def keys_of_worker(s, w, n):
    return [[x["__key__"] + x["__url__"] for x, _ in b] for b in s.worker_batches(w, n)]


def test_order_is_seeded_by_seed_and_epoch_and_resume_skips_exactly(shards):
    a, b = stream(shards), stream(shards)
    assert keys_of(a, 2) == keys_of(b, 2)
    b.set_epoch(1)
    other_seed = stream(shards, seed=1)
    assert keys_of(b, 2) != keys_of(a, 2) and keys_of(other_seed, 2) != keys_of(a, 2)
    assert sorted(map(sorted, keys_of(b, 2))) != sorted(map(sorted, keys_of(a, 2)))  # not just reordered batches
    full = keys_of(a, 2)
    a.skip = 3 * 2  # resuming at step 3
    assert len(a) == len(full) - 3 and keys_of(a, 2) == full[3:]
    # and the images themselves (crops seeded by position), through a DataLoader with 2 workers
    from util.shards import shard_loader
    a.skip = 0
    whole = [x[0] for x in shard_loader(a, 2, False)]
    a.skip = 6
    resumed = [x[0] for x in shard_loader(a, 2, False)]
    assert len(resumed) == len(whole) - 3 and all(torch.equal(x, y) for x, y in zip(resumed, whole[3:]))


def test_corrupt_image_in_a_shard_is_named_and_replaced(shards, tmp_path):
    from webdataset import TarWriter
    good = next(iter(__import__("util.shards", fromlist=["read_shard"]).read_shard(str(shards / "train-000000.tar"))))
    w = TarWriter(str(tmp_path / "train-000000.tar"))
    w.write({"__key__": "bad", "png": b"not a png"})
    w.write({"__key__": "good", "png": good["png"]})
    w.close()
    s = ShardStream(image_list(str(tmp_path), "train", labelled=False), pretrain_transform(32), 2, 0, train=False)
    with pytest.warns(UserWarning, match="unreadable image bad in .*train-000000.tar"):
        imgs, _, ok = next(iter(s))
    assert ok.tolist() == [0, 1] and torch.equal(imgs[0], imgs[1])


def test_pretraining_and_finetuning_train_on_shards(shards, tmp_path):
    """Pretraining with --decode fast (simplejpeg + torch's resize in the workers), finetuning with PIL."""
    out = tmp_path / "pre"
    args = main_pretrain.parse_args(PICO + ["--data_path", str(shards), "--batch_size", "4", "--epochs", "1",
                                            "--num_workers", "2", "--output_dir", str(out), "--decode", "fast"])
    assert args.num_images == 18
    assert main_pretrain.main(args) == 0
    log = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and log[0]["train_loss"] > 0
    ft = tmp_path / "ft"
    args = main_finetune.parse_args(["--model", "swin_pico_128", "--batch_size", "4", "--epochs", "1",
                                     "--num_workers", "1", "--device", "cpu", "--log_dir", "", "--print_freq", "1000",
                                     "--warmup_epochs", "0", "--finetune", str(out / "checkpoint-0.pth"),
                                     "--data_path", str(shards), "--output_dir", str(ft)])
    assert args.nb_classes == 3 and args.num_val == 9
    assert main_finetune.main(args) == 0
    log = [json.loads(l) for l in (ft / "log.txt").read_text().splitlines()]
    assert log[-1]["test_count"] == 9 if "test_count" in log[-1] else True
    assert "train_loss" in log[-1]


def test_decode_gpu_without_cuda_fails_before_any_work(shards, tmp_path):
    from util.cli import UsageError
    with pytest.raises(UsageError, match="--decode gpu decodes on a CUDA device"):
        main_pretrain.parse_args(PICO + ["--data_path", str(shards), "--output_dir", str(tmp_path), "--decode", "gpu"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU decoder)")
def test_pretraining_with_gpu_decoding_on_shards(shards, tmp_path):
    args = main_pretrain.parse_args([a if a != "cpu" else "cuda" for a in PICO] +
                                    ["--data_path", str(shards), "--batch_size", "4", "--epochs", "1",
                                     "--num_workers", "1", "--output_dir", str(tmp_path), "--decode", "gpu"])
    assert main_pretrain.main(args) == 0


def test_list_files_convert_with_their_labels_and_stray_archives_do_not_hide_a_layout(tmp_path, shards):
    from tools import make_shards
    src = tmp_path / "listed"
    (src / "train" / "x").mkdir(parents=True)
    for i, png in enumerate(sorted((shards.parent / "src" / "train" / "class_0").glob("*.png"))[:3]):
        (src / "train" / "x" / f"{i}.png").write_bytes(png.read_bytes())
    (src / "train.txt").write_text("x/0.png 4\nx/1.png 7\nx/2.png 4\n")
    (src / "ILSVRC2012_img_train.tar").write_bytes(b"")  # an original archive kept beside the layout
    assert len(image_list(str(src), "train", labelled=True)) == 3  # the list, not the archive
    assert make_shards.main(["--data_path", str(src), "--output_dir", str(tmp_path / "out"), "--no_shuffle"]) == 0
    from util.shards import read_shard
    labels = [int(s["cls"]) for s in read_shard(str(tmp_path / "out" / "train-000000.tar"))]
    assert labels == [4, 7, 4]
    images = image_list(str(tmp_path / "out"), "train", labelled=True)
    assert len(images) == 3 and len(images.classes) == 8


# ---- faults: indexes that disagree with their shards, bad samples, limits, interrupted conversions ----

def copy_shards(shards: Path, dst: Path) -> Path:
    shutil.copytree(shards, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def edit_index(folder: Path, edit, split: str = "train") -> None:
    path = folder / f"{split}.json"
    index = json.loads(path.read_text())
    for entry in index["shardlist"]:
        edit(entry)
    path.write_text(json.dumps(index))


def test_an_index_is_checked_against_its_shards_before_anything_is_allocated(shards, tmp_path, capsys):
    d = copy_shards(shards, tmp_path / "a")
    edit_index(d, lambda e: e.update(nsamples=10 ** 10) if e["url"] == "train-000001.tar" else None)
    with pytest.raises(DataError, match=r"10,000,000,000 samples for train-000001.tar, but its 92,160 bytes hold "
                                        r"at most 90; rebuild the index .*--reindex"):
        image_list(str(d), "train", labelled=False)
    for bad in (-3, 0, 2.5, "5"):
        edit_index(d, lambda e: e.update(nsamples=bad) if e["url"] == "train-000001.tar" else None)
        with pytest.raises(DataError, match=f"says {bad!r} samples for train-000001.tar: a shard holds a whole"):
            image_list(str(d), "train", labelled=False)
    # a shard replaced after the index was written (another size): its headers are read instead, and it is named
    d = copy_shards(shards, tmp_path / "b")
    shutil.copy(d / "train-000003.tar", d / "train-000001.tar")        # 3 samples where the index says 5
    capsys.readouterr()
    assert len(image_list(str(d), "train", labelled=False)) == 5 + 3 + 5 + 3
    assert "train-000001.tar is 61,440 bytes, its index train.json recorded 92,160" in capsys.readouterr().out
    # one cut inside a member after the index was written: named at start-up, before any worker exists
    (d / "train-000001.tar").write_bytes((shards / "train-000001.tar").read_bytes()[:30_000])
    with pytest.raises(DataError, match=r"shard .*train-000001.tar cannot be read: ReadError: unexpected end of data"):
        image_list(str(d), "train", labelled=False)


def test_counts_too_low_are_found_where_the_shard_is_read(shards, tmp_path):
    d = copy_shards(shards, tmp_path / "low")
    edit_index(d, lambda e: e.update(nsamples=2))                      # 10 of 18 images would never be used
    s = ShardStream(image_list(str(d), "train", labelled=False), pretrain_transform(32), 2, 0, train=True)
    from util.shards import IndexMismatch
    with pytest.raises(IndexMismatch, match=r"holds more samples than the 2 its index says: .*--reindex"):
        keys_of(s, 1)
    from tools import make_shards
    assert make_shards.main(["--reindex", "--output_dir", str(d), "--splits", "train"]) == 0
    assert len(image_list(str(d), "train", labelled=True)) == 18 and len(keys_of(stream(d), 1)) == 9


def test_a_data_error_with_loader_workers_ends_the_run_in_one_line_and_exits(shards, tmp_path):
    d = copy_shards(shards, tmp_path / "low")
    edit_index(d, lambda e: e.update(nsamples=2))
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "main_pretrain.py"), *PICO, "--batch_size", "2", "--epochs", "1",
                        "--num_workers", "2", "--data_path", str(d), "--output_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 1 and time.time() - t0 < 120, r.stderr[-2000:]   # (the workers would keep it waiting)
    errors = [l for l in r.stderr.splitlines() if "holds more samples than the 2 its index says" in l]
    assert len(errors) == 1 and errors[0].startswith("error: shard ") and "Traceback" not in r.stderr
    assert json.loads((tmp_path / "out" / "run-001.json").read_text())["finished"]["status"] == "failed"


def test_a_brace_range_a_digit_too_long_is_refused_before_it_is_expanded(shards):
    from util.shards import brace_count
    assert brace_count("a-{000000..000146}.tar") == 147 and brace_count("{a,b}-{0..9..2}-{x,{1..3}}") == 2 * 5 * 4
    assert brace_count("{0..999999999}") == 10 ** 9 and brace_count("no{brace") == 1
    t0 = time.time()
    with pytest.raises(DataError, match=r"names 1,000,000,000 shards, more than the 1,000,000 accepted"):
        image_list(str(shards / "train-{000000..999999999}.tar"), "train", labelled=False)
    assert time.time() - t0 < 5


def tar_with(path: Path, members: list) -> Path:
    """A shard from (name, bytes) regular members and (name, '->', target) symbolic links, in order."""
    with tarfile.open(path, "w") as tar:
        for name, *rest in members:
            info = tarfile.TarInfo(name)
            if rest[0] == "->":
                info.type, info.linkname = tarfile.SYMTYPE, rest[1]
                tar.addfile(info)
            else:
                info.size = len(rest[0])
                tar.addfile(info, io.BytesIO(rest[0]))
    return path


def test_unusable_samples_are_named_and_replaced_and_a_batch_of_one_bad_image_goes_on(shards, tmp_path, monkeypatch):
    import util.shards as shard_mod
    png = next(read_shard(str(shards / "train-000000.tar")))["png"]
    monkeypatch.setattr(shard_mod, "MAX_MEMBER_BYTES", len(png) + 10)
    d = tmp_path / "bad"
    d.mkdir()
    members = [("z000.png", b""), ("z000.cls", b"0"),                               # 0-byte image (T3, T15)
               ("a000.png", png), ("a000.cls", b"1"),
               ("k000.png", png), ("k000.cls", b"0"), ("k000.png", png),            # a key twice in a row (T4a)
               ("t000.txt", b"no image"), ("t000.cls", b"0"),                        # no image (T2)
               ("h000.png", png + b"\0" * 20), ("h000.cls", b"0"),                  # over the member limit (T7a)
               ("l000.png", "->", "/etc/passwd"),                                    # a link member (T6)
               ("c000.png", png), ("c000.cls", b"7"),                               # class outside the index's (T14)
               ("b000.png", png), ("b000.cls", b"2"),
               ("y000.png", b"\x89PNG broken")]                                      # last, nothing after it
    tar_with(d / "train-000000.tar", members)
    (d / "train.json").write_text(json.dumps({"shardlist": [{"url": "train-000000.tar", "nsamples": 8,
                                                             "filesize": (d / "train-000000.tar").stat().st_size}],
                                              "classes": ["x", "y", "z"]}))
    images = image_list(str(d), "train", labelled=True)
    assert len(images) == 8
    s = ShardStream(images, pretrain_transform(32), 1, 0, train=False)      # batch 1: an all-bad batch each time
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(s)
    text = "\n".join(str(w.message) for w in caught)
    assert [int(b[2][0]) for b in batches] == [0, 1, 0, 0, 0, 0, 1, 0]
    assert [int(b[1][0]) for b in batches] == [1, 1, 2, 2, 2, 2, 2, 2]     # the next usable one, the last: the one before
    for expected in ("z000 in", "UnidentifiedImageError", "k000 in", "two 'png' entries", "t000 in", "has no image",
                     "h000 in", "over the limit of", "c000 in", "class 7 is outside 0..2", "link member l000.png left out"):
        assert expected in text, (expected, text)


def test_a_shard_cut_while_reading_names_the_rest_and_goes_on(shards, tmp_path):
    from util.shards import ShardImages
    cut = tmp_path / "train-000000.tar"
    cut.write_bytes((shards / "train-000000.tar").read_bytes()[:40_000])   # 2 of 5 samples whole
    images = ShardImages([str(cut)], [5], [], str(tmp_path))               # as planned before it was cut
    with pytest.warns(UserWarning, match=r"samples 2-4 in .*cannot be read: ReadError"):
        (imgs, _, ok), = list(ShardStream(images, pretrain_transform(32), 5, 0, train=False))
    assert ok.tolist() == [1, 1, 0, 0, 0] and imgs.shape[0] == 5


def test_a_conversion_is_locked_resumable_and_its_partial_output_refused(shards, tmp_path, monkeypatch, capsys):
    from tools import make_shards
    src = shards.parent / "src"
    argv = ["--data_path", str(src), "--shard_size", "5", "--splits", "train"]
    assert make_shards.main(argv + ["--output_dir", str(tmp_path / "whole")]) == 0

    class Killed(BaseException):
        pass
    real, calls = make_shards._write_json, []

    def dying(obj, path):     # dies after the third shard was renamed, before its record (the worst moment)
        calls.append(path.name)
        if calls.count("train.incomplete.json") == 4:
            raise Killed
        real(obj, path)
    monkeypatch.setattr(make_shards, "_write_json", dying)
    out = tmp_path / "cut"
    with pytest.raises(Killed):
        make_shards.main(argv + ["--output_dir", str(out)])
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-00000{i}.tar" for i in range(3)]
    with pytest.raises(DataError, match=r"partial output of tools/make_shards.py \(train: 2 shards written .*--resume"):
        image_list(str(out), "train", labelled=True)
    assert make_shards.main(argv + ["--output_dir", str(out)]) == 2
    assert "interrupted conversion of train (train.incomplete.json): add --resume" in capsys.readouterr().err
    assert make_shards.main(argv + ["--output_dir", str(out), "--resume"]) == 0
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir() if not p.name.startswith("."))
    assert whole == sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert all((out / n).read_bytes() == (tmp_path / "whole" / n).read_bytes() for n in whole)
    # a shard folder as the source (T13): one line
    assert make_shards.main(["--data_path", str(shards), "--output_dir", str(tmp_path / "x")]) == 2
    assert "holds tar shards already" in capsys.readouterr().err


def test_a_resume_on_changed_shards_is_named_and_refused_mid_epoch(shards, tmp_path):
    from test_faults import state_args, tiny
    from util.cli import UsageError
    from util.train_state import resume_training_state, save_training_state
    before = image_list(str(shards), "train", labelled=False).fingerprint()
    d = copy_shards(shards, tmp_path / "changed")
    (d / "train-000003.tar").unlink()
    edit_index(d, lambda e: None)
    index = json.loads((d / "train.json").read_text())
    index["shardlist"] = index["shardlist"][:3]
    (d / "train.json").write_text(json.dumps(index))
    after = image_list(str(d), "train", labelled=False).fingerprint()
    out = tmp_path / "out"
    model, opt = tiny()
    save_training_state(state_args(out, data_fingerprint=before), 1, model, opt, None, next_step=2)
    lines = []
    log = lambda *a, **k: lines.append(" ".join(map(str, a)))  # noqa: E731
    with pytest.raises(UsageError, match=r"stopped mid-epoch 1 on other training shards \(1 removed "
                                         r"\(train-000003.tar\)\): its position would now mean other samples"):
        resume_training_state(state_args(out, data_fingerprint=after), *tiny(seed=1), None, log=log)
    assert resume_training_state(state_args(out, data_fingerprint=after, allow_changed_args=True), *tiny(seed=1),
                                 None, log=log)[:2] == (1, 2)
    assert "training shards changed since checkpoint-last.pth was written: 1 removed" in lines[-2]
    save_training_state(state_args(out, data_fingerprint=before), 1, model, opt, None)   # end of epoch: a warning
    assert resume_training_state(state_args(out, data_fingerprint=after), *tiny(seed=1), None, log=log)[:2] == (2, 0)
    assert any("1 removed" in line for line in lines[-3:])
