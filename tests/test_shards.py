"""Tar-shard data sets: conversion, splitting over ranks and workers, seeded order, exact resume, training."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_finetune
import main_pretrain
from tiny_data import make_labelled
from errors import DataError
from imagedata.datasets import image_list, pretrain_transform
from imagedata.shards import ShardStream, scan_shard

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
    from imagedata.shards import shard_loader
    a.skip = 0
    whole = [x[0] for x in shard_loader(a, 2, False)]
    a.skip = 6
    resumed = [x[0] for x in shard_loader(a, 2, False)]
    assert len(resumed) == len(whole) - 3 and all(torch.equal(x, y) for x, y in zip(resumed, whole[3:]))


def test_corrupt_image_in_a_shard_is_named_and_replaced(shards, tmp_path):
    from webdataset import TarWriter
    good = next(iter(__import__("imagedata.shards", fromlist=["read_shard"]).read_shard(str(shards / "train-000000.tar"))))
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
    from errors import UsageError
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
    from imagedata.shards import read_shard
    labels = [int(s["cls"]) for s in read_shard(str(tmp_path / "out" / "train-000000.tar"))]
    assert labels == [4, 7, 4]
    images = image_list(str(tmp_path / "out"), "train", labelled=True)
    assert len(images) == 3 and len(images.classes) == 8
