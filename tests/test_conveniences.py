"""What a researcher expects around a run: records, summaries, inferred sizes, defaults, --help, permissions,
submitit without stray folders, the backbone example from any folder."""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import main_finetune
import main_pretrain
import models
from programs import ROOT
from engine import distributed
from launch import slurm
from engine.checkpoint import save_atomic

PICO = ["--model", "mae_swin_pico_128", "--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss",
        "--num_workers", "0", "--print_freq", "1", "--device", "cpu", "--batch_size", "4", "--warmup_epochs", "0",
        "--lr", "1e-3"]


def _parsers():
    from tools import benchmark
    return {"main_pretrain": main_pretrain.get_args_parser(), "main_finetune": main_finetune.get_args_parser(),
            "submitit_pretrain": slurm.build_parser(main_pretrain), "submitit_finetune": slurm.build_parser(main_finetune),
            "benchmark": benchmark.get_args_parser()}


def test_every_flag_has_help_and_help_shows_defaults():
    for name, parser in _parsers().items():
        missing = [a.option_strings[0] for a in parser._actions
                   if not isinstance(a, argparse._HelpAction) and not a.help]
        assert not missing, (name, missing)
    text = " ".join(main_pretrain.get_args_parser().format_help().split())
    assert "images per GPU (effective = batch * accum * GPUs) (default: 64)" in text
    assert "(default: OUTPUT_DIR/tensorboard; '' disables)" in text and "--cpu_tuning" in text
    ft = " ".join(main_finetune.get_args_parser().format_help().split())
    assert "base lr per 256 images (default: 0.001)" in ft and "inferred from the data" in ft


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoints_get_the_usual_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_atomic({"w": torch.zeros(2)}, tmp_path / "checkpoint-0.pth")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_num_workers_default_follows_the_cpus_of_each_rank(monkeypatch):
    for k in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert distributed.default_num_workers(cpu) == 1 and distributed.default_num_workers(gpu) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert distributed.default_num_workers(gpu) == 10                      # MAE's 10 at most
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")                             # torchrun: 8 ranks share 32 CPUs
    assert distributed.default_num_workers(gpu) == 4 and distributed.default_num_workers(cpu) == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert distributed.default_num_workers(gpu) == 6
    args = main_pretrain.get_args_parser().parse_args([])
    assert args.num_workers is None and args.log_dir is None and args.cpu_matmul is None


def test_run_records_eta_summary_and_tensorboard_inside_output_dir(tmp_path, capsys):
    from tiny_data import make_images
    data, out = make_images(tmp_path / "data", n=4, size=64), tmp_path / "out"   # one step per epoch
    for epochs, extra in (("1", []), ("2", ["--allow_changed_args"])):  # the second start extends the run in place
        args = main_pretrain.parse_args(PICO + ["--epochs", epochs, "--output_dir", str(out), "--data_path", str(data),
                                                "--vis_freq", "0"] + extra)
        assert args.log_dir == str(out / "tensorboard")
        assert main_pretrain.main(args) == 0
    text = capsys.readouterr().out
    first, second = (json.loads((out / f"run-00{i}.json").read_text()) for i in (1, 2))
    assert not (out / "run-003.json").exists()
    for rec in (first, second):
        assert rec["program"] == "main_pretrain" and "--output_dir" in rec["argv"] and "main_pretrain.py" in rec["command"]
        assert rec["args"]["model"] == "mae_swin_pico_128" and rec["args"]["num_workers"] == 0
        assert rec["versions"]["torch"] == torch.__version__ and {"python", "timm", "cuda"} <= set(rec["versions"])
        assert rec["world_size"] == 1 and rec["devices"][0]["device"] == "cpu" and rec["devices"][0]["threads"] >= 1
        assert rec["finished"]["status"] == "completed" and rec["finished"]["final"]["loss"] > 0
        if (ROOT / ".git").exists():
            assert re.fullmatch(r"[0-9a-f]{40}", rec["git"]["commit"])
    assert first["start"]["epoch"] == 0 and second["start"]["epoch"] == 1 and second["finished"]["epochs_run"] == 1
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    assert re.search(r"Epoch \[1\] \[1/1\] eta 0:00:00 \(run 0:00:00\)", text)
    assert "epoch 2/2 done; " in text and "run eta 0:00:00 (0 epochs left)" in text
    summaries = [l for l in text.splitlines() if l.startswith("summary: ")]
    assert len(summaries) == 2 and "pretraining completed in" in summaries[1]
    assert "epochs 1-1 of 2 (1 in this run); final loss" in summaries[1] and str(out.resolve()) in summaries[1]


def test_nb_classes_is_inferred_and_eval_writes_json(tmp_path, capsys):
    from tiny_data import make_labelled
    data = make_labelled(tmp_path / "data", per_class=4, size=40)
    common = ["--model", "swin_pico_128", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--log_dir",
              "", "--print_freq", "1000", "--warmup_epochs", "0", "--data_path", str(data),
              "--output_dir", str(tmp_path / "ft")]
    assert main_finetune.parse_args(common + ["--epochs", "1"]).nb_classes == 3        # train/ and val/ read
    ckpt = tmp_path / "classifier.pth"
    torch.save({"model": models.create_model("swin_pico_128", num_classes=3).state_dict(), "epoch": 7}, ckpt)
    args = main_finetune.parse_args(common + ["--eval", "--finetune", str(ckpt)])  # val/ only
    assert args.nb_classes == 3 and main_finetune.main(args) == 0
    result = json.loads((tmp_path / "ft" / "eval.json").read_text())
    assert result["count"] == 6 and result["nb_classes"] == 3 and result["weights"] == str(ckpt)
    assert 0 <= result["acc1"] <= 100 and result["model"] == "swin_pico_128" and result["input_size"] == 128
    assert "summary: swin_pico_128 evaluation completed in" in capsys.readouterr().out
    assert json.loads((tmp_path / "ft" / "run-001.json").read_text())["finished"]["metrics"]["count"] == 6


def test_submitit_local_from_another_folder_leaves_no_stray_folders(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.delenv("PYTHONPATH", raising=False)                # restored afterwards; submit sets it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)                                    # not the repository root
    jobs = tmp_path / "jobs"
    from tiny_data import make_images
    data = make_images(tmp_path / "data", n=4, size=64)
    args = slurm.prepare(main_pretrain, PICO + ["--epochs", "1", "--local", "--timeout", "30", "--data_path", str(data),
                                                "--job_dir", str(jobs / "%j"), "--log_dir", ""])
    assert args.ngpus == (torch.cuda.device_count() or 1)
    assert list(scratch.iterdir()) == []                           # the validation folder is gone
    job = slurm.submit("main_pretrain", args)
    assert job.results() == [0]
    assert sorted(p.name for p in jobs.iterdir()) == sorted([str(job.job_id), "shared"])
    rec = json.loads((jobs / str(job.job_id) / "run-001.json").read_text())
    assert "--local" in rec["argv"] and rec["world_size"] == 1 and rec["finished"]["status"] == "completed"


def test_backbone_example_in_finetune_md_runs_from_any_folder(tmp_path):
    from tools.export_backbone import export_backbone
    text = (ROOT / "FINETUNE.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "load_backbone" in b)
    folder = re.search(r'folder = "([^"]+)"', snippet).group(1)
    ckpt = tmp_path / "classifier.pth"
    torch.save(models.create_model("swin_pico_128", num_classes=0).state_dict(), ckpt)
    export_backbone(str(ckpt), "swin_pico_128", str(tmp_path / folder))   # a pico stand-in for Swin-T
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "(2, 150, 32, 32)"
