"""Preemption, requeue, signals, crash-safe checkpoints and distributed faults."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_pretrain
from util import slurm
from programs import ROOT, launch, read_until
from util.checkpoint import list_checkpoints, load_latest, safe_load, save_atomic

PY = sys.executable
TINY = ["--model", "mae_swin_pico_128", "--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss",
        "--num_workers", "0", "--print_freq", "4", "--device", "cpu", "--batch_size", "2", "--warmup_epochs", "1",
        "--lr", "1e-3"]


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_for(pred, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def weights(out: Path) -> dict:
    return safe_load(out / "checkpoint-last.pth")["model"]


def test_submitit_preemption_requeues_and_ends_with_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two tasks on a 2-core machine
    def run(name: str, preempt: bool) -> Path:
        job_dir = tmp_path / f"{name}_%j"
        args = slurm.prepare(main_pretrain, TINY + ["--epochs", "5", "--local", "--ngpus", "2", "--timeout", "60",
                                                    "--job_dir", str(job_dir), "--log_dir", ""])
        job = slurm.submit("main_pretrain", args)
        out = Path(str(job_dir).replace("%j", str(job.job_id)))
        if preempt:
            wait_for(lambda: (out / "log.txt").is_file(), 120, "the first epoch")
            assert len(children(int(job.job_id))) == 2
            for pid in children(int(job.job_id)):
                os.kill(pid, signal.SIGUSR2)           # what SLURM does on preemption: signal every task
        job.results()
        return out
    plain, preempted = run("plain", False), run("preempted", True)
    logs = "".join(p.read_text() for p in preempted.glob("*_0_log.out"))
    assert "stop signal: checkpoint written at epoch" in logs and "resumed from" in logs, logs[-2000:]
    a, b = weights(plain), weights(preempted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert safe_load(preempted / "checkpoint-last.pth")["epoch"] == 4


def test_sigterm_checkpoints_exits_quickly_and_restart_continues(tmp_path):
    common = TINY + ["--epochs", "6", "--log_dir", ""]
    main_pretrain.main(main_pretrain.parse_args(common + ["--output_dir", str(tmp_path / "ref")]))
    out = tmp_path / "run"
    proc = launch([ROOT / "main_pretrain.py", *common, "--output_dir", out], until="Epoch [1]")
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0 and time.time() - sent < 10, rest
    assert "stop signal: checkpoint written" in rest
    ck = safe_load(out / "checkpoint-last.pth")
    assert ck["epoch"] == 1 and ck["next_step"] > 0
    main_pretrain.main(main_pretrain.parse_args(common + ["--output_dir", str(out)]))
    a, b = weights(tmp_path / "ref"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_signal_exits_at_once(tmp_path):
    # a long accumulation keeps the next step boundary (where the first signal is honoured) far enough away
    proc = launch([ROOT / "main_pretrain.py", *TINY, "--epochs", "50", "--log_dir", "", "--accum_iter", "64",
                   "--output_dir", tmp_path / "o"], until="Epoch [0]")
    proc.send_signal(signal.SIGUSR1)
    read_until(proc, "received SIGUSR1")
    proc.send_signal(signal.SIGTERM)   # a second signal (of another kind: equal ones can merge in the kernel)
    assert proc.wait(timeout=30) == 143


KILL_MID_WRITE = r"""
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from util.checkpoint import save_atomic
real_save = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"PK\x03\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
save_atomic({{"model": {{"w": torch.ones(3)}}, "epoch": 5}}, {path!r})
"""


def test_sigkill_while_writing_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    save_atomic({"model": {"w": torch.zeros(3)}, "epoch": 4}, path)
    proc = subprocess.run([PY, "-c", KILL_MID_WRITE.format(root=str(ROOT), path=str(path))], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert safe_load(path)["epoch"] == 4                 # the name still holds the previous, complete file
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())   # the half-written temporary
    found = load_latest(tmp_path, log=lambda m: None)
    assert found[0] == path and found[1]["epoch"] == 4


def test_keep_last_prunes_old_numbered_checkpoints(tmp_path):
    out = tmp_path / "o"
    main_pretrain.main(main_pretrain.parse_args(TINY + ["--epochs", "4", "--save_freq", "1", "--keep_last", "2",
                                                        "--log_dir", "", "--output_dir", str(out)]))
    assert sorted(p.name for p in list_checkpoints(out)) == ["checkpoint-2.pth", "checkpoint-3.pth",
                                                             "checkpoint-last.pth"]


def test_a_dead_rank_stops_the_others_in_bounded_time(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    from util.distributed import free_port
    out = tmp_path / "o"
    proc = launch(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   ROOT / "main_pretrain.py", *TINY, "--epochs", "200", "--log_dir", "", "--dist_timeout", "1",
                   "--output_dir", out], until="Epoch [0]", env=env)
    workers = children(proc.pid)
    rank1 = [p for p in workers if "RANK=1" in Path(f"/proc/{p}/environ").read_text().split("\x00")]
    assert rank1, workers
    killed = time.time()
    os.kill(rank1[0], signal.SIGKILL)
    proc.stdout.read()
    code = proc.wait(timeout=120)
    assert code != 0 and time.time() - killed < 90


def test_rank_exception_reaches_the_log_with_its_rank(monkeypatch, capsys):
    from util.cli import run_main
    monkeypatch.setenv("RANK", "3")

    def boom():
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_main(boom)
    assert "rank 3 failed" in capsys.readouterr().err


@pytest.mark.parametrize("accum", [1, 2, 3, 4, 8])
def test_ranks_check_for_a_stop_at_least_every_four_optimizer_steps(accum):
    from util.loop import STOP_CHECK_EVERY, stop_check_due
    steps = 101
    boundaries = [s for s in range(steps) if (s + 1) % accum == 0 or s + 1 == steps]
    due = [s for s in boundaries if stop_check_due(s, accum, steps)]
    assert due[-1] == steps - 1                                # always at the end of an epoch
    gaps = [(b - a) // accum for a, b in zip([-1] + due, due)]
    assert max(gaps) <= STOP_CHECK_EVERY, (accum, due[:6])


def test_complete_epoch_beats_a_mid_epoch_checkpoint_of_the_same_epoch(tmp_path):
    save_atomic({"model": {}, "epoch": 3, "next_step": 5}, tmp_path / "checkpoint-last.pth")
    save_atomic({"model": {}, "epoch": 3}, tmp_path / "checkpoint-3.pth")
    assert load_latest(tmp_path, log=lambda m: None)[0].name == "checkpoint-3.pth"


def test_shard_sampler_covers_every_item_once():
    from util.datasets import ShardSampler
    parts = [list(ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10)) and [len(p) for p in parts] == [4, 3, 3]
