"""What a first GPU run needs, shown on the CPU where the behaviour shows there: compile without
graph breaks (or a refusal by name), a GPU decoder that fails is reported instead of silently
replaced, a one-process torchrun builds the process group, ranks agree on a stop without waiting for
the device, memory peaks per epoch over all ranks, the benchmark's FLOPs and numerics, figures that
never list the training set again. CUDA-only checks are marked and run on a GPU (and in
scripts/gpu_check.sh)."""
import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import main_pretrain
import models
import util.decode as decode
from models.masking import random_mask
from util.cli import UsageError
from util.datasets import seeded_apply
from util.distributed import free_port, init_distributed, is_dist, local_gpu

ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def jpeg(seed: int, w: int = 80, h: int = 60) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    return b.getvalue()


# ---------------------------------------------------------------- compile


def test_mae_vit_mask_check_does_not_break_the_compiled_graph():
    import torch._dynamo
    torch.manual_seed(0)
    m = models.create_model("mae_vit_pico_patch16").train()
    mask = random_mask(2, m.token_size ** 2, 0.75, generator=torch.Generator().manual_seed(0))
    imgs = torch.randn(2, 3, m.contract.input_size, m.contract.input_size)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(m)(imgs, mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_greenmim_compile_is_refused_by_name(capsys):
    name = "greenmim_swin_pico_patch4_win6_dec64b1"
    assert models.describe(name).compile_note and not models.describe("mae_swin_pico_128").compile_note
    with pytest.raises(UsageError, match=f"--compile does not suit {name}"):
        main_pretrain.parse_args(["--model", name, "--compile", "--device", "cpu"])
    from tools import benchmark
    with pytest.raises(SystemExit):
        benchmark.main(["--models", name, "--compile", "--device", "cpu"])
    assert f"--compile does not suit {name}" in capsys.readouterr().err


# ---------------------------------------------------------------- GPU decoding


def _planned(n: int, start: int = 0):
    plan = decode.PlanTransform(32)
    return [seeded_apply(plan, decode.Encoded(jpeg(start + i), f"img{start + i}.jpg"), i) for i in range(n)]


def test_a_decoder_that_fails_every_batch_warns_with_the_cause_then_stops(monkeypatch, recwarn):
    def broken(*args, **kwargs):
        raise RuntimeError("nvjpeg failure: CUDA driver version is insufficient")
    monkeypatch.setattr(decode, "decode_jpeg", broken)
    stats = decode.DecodeStats()
    imgs, ok = decode.decode_planned(_planned(4), 32, torch.device("cpu"), stats)
    assert imgs.shape == (4, 3, 32, 32) and ok.tolist() == [1] * 4      # PIL read them all
    assert stats.pil_fallbacks == 4 and stats.jpegs == 4 and stats.failed_batches == 1
    msgs = [str(w.message) for w in recwarn.list if "JPEG decoder" in str(w.message)]
    assert len(msgs) == 1 and "nvjpeg failure: CUDA driver version is insufficient" in msgs[0]
    for _ in range(decode.MAX_FAILED_BATCHES - 2):
        decode.decode_planned(_planned(4, 10), 32, torch.device("cpu"), stats)
    with pytest.raises(RuntimeError, match=f"read no JPEG of {decode.MAX_FAILED_BATCHES} batches in a row"):
        decode.decode_planned(_planned(4, 20), 32, torch.device("cpu"), stats)


def test_one_bad_file_is_not_a_broken_decoder_and_refusals_are_reported_per_epoch(monkeypatch):
    real = decode.decode_jpeg
    planned = _planned(3)
    refused = planned[1].data   # as a GPU decoder refusing a CMYK file

    def refuses_one(data, *args, **kwargs):
        if isinstance(data, list):
            return [refuses_one(d, *args, **kwargs) for d in data]
        if data.numpy().tobytes() == refused:
            raise RuntimeError("unsupported chroma subsampling")
        return real(data, *args, **kwargs)
    monkeypatch.setattr(decode, "decode_jpeg", refuses_one)
    loader = decode.GpuDecodeLoader([decode.collate_planned([(p, 0, 1) for p in planned])], 32, torch.device("cpu"))
    with pytest.warns(UserWarning, match="1 of 3 JPEGs this epoch were refused by the GPU decoder"):
        (imgs, _, ok), = list(loader)
    assert ok.tolist() == [1, 1, 1] and loader.stats.failed_batches == 0 and loader.stats.pil_fallbacks == 1


def test_normalisation_constants_are_copied_to_a_device_once(monkeypatch):
    copies = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self is decode._MEAN or self is decode._STD:
            copies.append(args)
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    monkeypatch.setattr(decode, "_ON_DEVICE", {})
    meta = torch.device("meta")
    for _ in range(3):
        decode.normalize(torch.empty(2, 3, 4, 4, device=meta))
    assert len(copies) == 2  # mean and std, once


def _gpu_ctx():
    from types import SimpleNamespace
    return SimpleNamespace(dry_run=False, device=torch.device("cuda"), say=lambda line: None)


@CUDA
def test_gpu_decoding_while_a_step_is_in_flight_corrupts_nothing():
    from tools.gpu_check import decode_race
    r = decode_race(repeats=10, images=32, variant="ours")
    assert r["corrupted_runs"] == 0, r


@CUDA
def test_gpu_decoding_of_awkward_jpegs_matches_the_cpu():
    from tools.gpu_check import part_decode_awkward
    r = part_decode_awkward(_gpu_ctx())
    assert r["status"] == "passed", r["rows"]


@CUDA
def test_one_process_nccl_ddp_steps_and_agrees_on_stops_without_synchronising():
    from tools.gpu_check import part_ddp
    r = part_ddp(_gpu_ctx())
    assert r["status"] == "passed" and r["backend"] == "nccl" and r["stop_agreement_syncs"] == 0, r


# ---------------------------------------------------------------- distributed


def _launcher_env(monkeypatch, local_rank: int = 0) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def test_a_one_process_torchrun_builds_a_process_group_and_ddp(monkeypatch):
    from util.run import wrap_for_training
    _launcher_env(monkeypatch)
    args = argparse.Namespace(device="cpu", dist_url="env://", dist_timeout=1, compile=False)
    init_distributed(args)
    try:
        assert args.distributed and is_dist() and dist.get_world_size() == 1
        model = models.create_model("mae_swin_pico_128")
        ddp = wrap_for_training(model, args, torch.device("cpu"))
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        assert ddp.gradient_as_bucket_view  # no second copy of every gradient
    finally:
        dist.destroy_process_group()


def test_local_rank_maps_onto_the_visible_gpus(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM --gpus-per-task=1: one GPU, cuda:0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert local_gpu(3, 11) == 0
    assert "rank 11: LOCAL_RANK 3, 1 visible GPU(s) (CUDA_VISIBLE_DEVICES=3): using cuda:0" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert local_gpu(3, 3) == 3 and capsys.readouterr().out == ""


def test_ranks_agree_on_a_stop_one_check_later_without_reading_the_device_and_report_the_largest_memory(tmp_path):
    import json
    import torch.multiprocessing as mp
    from two_rank_agreement import worker
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    # checks every 4 steps (after steps 3, 7, 11, 15): the request at step 9 is all-reduced at the check
    # after step 11 and read at the next one, after step 15, on both ranks
    assert r[0]["stops"] == r[1]["stops"] == [15]
    assert r[0]["reduced"] == r[1]["reduced"] == [300.0, 900.0]   # the largest allocated, the largest reserved


def test_epoch_memory_peak_is_reset_and_reports_reserved(monkeypatch):
    from util.loop import peak_memory_mb, reset_peak_memory
    state = {"alloc": 3 * 2 ** 20, "reserved": 8 * 2 ** 20, "resets": 0}

    def reset(device=None):
        state["resets"] += 1
        state["alloc"] = state["reserved"] = 0
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: state["reserved"])
    dev = torch.device("cuda", 0)
    assert peak_memory_mb(dev) == (3.0, 8.0)
    reset_peak_memory(dev)
    assert state["resets"] == 1 and peak_memory_mb(dev) == (0.0, 0.0)


# ---------------------------------------------------------------- benchmark and figures


def test_benchmark_counts_flops_at_a_small_batch_and_uses_the_programs_numerics(monkeypatch):
    from tools import benchmark
    seen, numerics = [], []
    real_count = benchmark.count_flops

    def spy(model, imgs, *args):
        seen.append(imgs.shape[0])
        return real_count(model, imgs, *args)
    monkeypatch.setattr(benchmark, "count_flops", spy)
    monkeypatch.setattr(benchmark, "gpu_numerics", numerics.append)
    report = benchmark.main(["--models", "simmim_pvt_pico_128", "--batch_size", "6", "--steps", "1", "--warmup", "0",
                             "--device", "cpu"])
    assert seen == [benchmark.FLOP_BATCH] and numerics == [torch.device("cpu")]
    (r,) = report["results"]
    m = models.create_model("simmim_pvt_pico_128")
    mask = random_mask(6, m.token_size ** 2, 0.75, generator=torch.Generator().manual_seed(0))
    full = real_count(m, torch.randn(6, 3, 128, 128), mask, None, "none", torch.device("cpu"))
    assert r["flops_per_step"] == full  # linear in the batch: the small count scaled is the full count


def test_figures_never_list_the_training_set_again(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"img{i}.jpg").write_bytes(jpeg(i, 96, 96))
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)
    listings = []
    import util.datasets
    real = util.datasets.image_list

    def counting(*args, **kwargs):
        listings.append(args)
        return real(*args, **kwargs)
    args = main_pretrain.parse_args(["--model", "mae_swin_pico_128", "--mask_regular", "--data_path", str(data),
                                     "--batch_size", "2", "--epochs", "2", "--vis_freq", "1", "--num_workers", "0",
                                     "--print_freq", "1000", "--device", "cpu", "--decode", "fast",
                                     "--output_dir", str(tmp_path / "out"), "--log_dir", ""])
    monkeypatch.setattr(util.datasets, "image_list", counting)
    monkeypatch.setattr(main_pretrain, "image_list", counting)
    assert main_pretrain.main(args) == 0
    assert len(listings) == 1  # the data set's own listing at start-up; the two figures list nothing
    for epoch in (0, 1):
        assert (tmp_path / "out" / f"reconstruction-{epoch}.png").is_file()


# ---------------------------------------------------------------- the GPU check


def test_gpu_check_dry_run_runs_the_cpu_parts_and_prints_the_plan(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.index("torch ") < out.index("plan")           # versions first
    import json
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["versions"]["torch"] == torch.__version__
    ran = {p["part"]: p for p in report["parts"]}
    assert all(p["status"] in ("passed", "planned") for p in ran.values()), ran
    assert ran["cpu_vs_gpu"]["status"] == "passed" and ran["decode_awkward"]["status"] == "passed"
    assert ran["speed"]["status"] == "planned" and "tools/benchmark.py" in ran["speed"]["plan"]
