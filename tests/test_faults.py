"""Preemption, requeue, signals, crash-safe checkpoints and distributed faults."""
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_pretrain
from launch import slurm
from programs import ROOT, launch, read_until
from engine.checkpoint import list_checkpoints, load_latest, safe_load, save_atomic

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
        args = slurm.prepare(main_pretrain, TINY + ["--epochs", "3", "--local", "--ngpus", "2", "--timeout", "60",
                                                    "--num_workers", "2", "--job_dir", str(job_dir), "--log_dir", ""])
        job = slurm.submit("main_pretrain", args)
        out = Path(str(job_dir).replace("%j", str(job.job_id)))
        if preempt:
            wait_for(lambda: (out / "log.txt").is_file(), 120, "the first epoch")
            tasks = children(int(job.job_id))
            assert len(tasks) == 2
            wait_for(lambda: all(len(children(t)) == 2 for t in tasks), 120, "the DataLoader workers")
            for pid in tasks + [w for t in tasks for w in children(t)]:
                os.kill(pid, signal.SIGUSR2)           # what SLURM does on preemption: signal every process
        job.results()
        return out
    plain, preempted = run("plain", False), run("preempted", True)
    logs = "".join(p.read_text() for p in preempted.glob("*_0_log.out"))
    # the signal lands mid-epoch ("at epoch 1, step 7") or, on a fast machine, before an epoch's first step
    # ("at the end of epoch 0 (already on disk)"): both are honoured stops that the requeued job resumes from
    stop = re.search(r"stop signal: checkpoint written at (epoch \d+, step \d+|the end of epoch \d+ \(already on disk\))",
                     logs)
    assert stop and "resumed from" in logs, logs[-2000:]
    a, b = weights(plain), weights(preempted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert safe_load(preempted / "checkpoint-last.pth")["epoch"] == 2
    assert "killed by signal" not in logs


# what users run: DataLoader workers, which a signal sent to the process group reaches too
GROUP = TINY + ["--num_workers", "2", "--epochs", "3", "--log_dir", ""]
# CPU results depend on the intra-op thread count (how sums and GEMMs are split; 1 vs 2 threads: ~1e-4
# after three epochs), so the reference, the stopped run and the resumed one all run at this count,
# whatever OMP_NUM_THREADS the suite inherited (the subprocess and the module fixture, which is built
# before conftest's per-test setting, would take it) and whatever count an earlier test left here
THREADS = min(2, os.cpu_count() or 1)
THREADS_ENV = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}


@contextlib.contextmanager
def intra_op_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def recorded_threads(out: Path) -> list:
    """The intra-op thread count of each run in ``out``, from its run records (run-NNN.json)."""
    return [json.loads(p.read_text())["devices"][0].get("threads") for p in sorted(out.glob("run-*.json"))]


def weight_difference(a: dict, b: dict) -> str:
    """'' when equal; else how many tensors differ, the first few, and the largest difference."""
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    if not diff:
        return ""
    worst = max((a[k] - b[k]).abs().max().item() for k in diff)
    return f"{len(diff)} of {len(a)} tensors differ ({', '.join(diff[:3])}, ...), max |difference| {worst:.3g}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Final weights of an uninterrupted run of GROUP (workers do not change the data: crops are seeded per sample)."""
    out = tmp_path_factory.mktemp("ref")
    with intra_op_threads(THREADS):
        main_pretrain.main(main_pretrain.parse_args(GROUP + ["--num_workers", "0", "--output_dir", str(out)]))
    assert recorded_threads(out) == [THREADS]
    return weights(out)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_to_the_process_group_checkpoints_and_resume_is_exact(sig, code, reference, tmp_path):
    out = tmp_path / "run"
    proc = launch([ROOT / "main_pretrain.py", *GROUP, "--output_dir", out], until="Epoch [1]",
                  start_new_session=True, env={**os.environ, **THREADS_ENV})
    sent = time.time()
    os.killpg(proc.pid, sig)        # kill -SIG -- -PGID: the main process and both DataLoader workers
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == code, rest
    assert time.time() - sent < 60, rest
    assert "stop signal: checkpoint written at epoch 1" in rest and "Traceback" not in rest, rest
    ck = safe_load(out / "checkpoint-last.pth")
    assert ck["epoch"] == 1 and ck["next_step"] > 0
    stop = next(line for line in rest.splitlines() if line.startswith("stop signal"))
    with intra_op_threads(THREADS):
        main_pretrain.main(main_pretrain.parse_args(GROUP + ["--num_workers", "0", "--output_dir", str(out)]))
    # the promise holds at one thread count: the stopped run and the resumed one must have used the reference's
    assert recorded_threads(out) == [THREADS, THREADS]
    difference = weight_difference(reference, weights(out))
    assert not difference, f"{stop}: {difference}"


def test_second_signal_exits_at_once(tmp_path):
    # The first signal is honoured at the next optimizer step or at the epoch's end, whichever comes first.
    # 400 images at batch 2 and an accumulation longer than the epoch put that boundary 200 micro-steps
    # away (seconds even on an idle machine), so the second signal always lands before it.
    from tiny_data import make_images
    data = make_images(tmp_path / "data", n=400, size=32)
    proc = launch([ROOT / "main_pretrain.py", *TINY, "--epochs", "50", "--log_dir", "", "--accum_iter", "1000",
                   "--data_path", data, "--output_dir", tmp_path / "o"], until="Epoch [0]")
    proc.send_signal(signal.SIGUSR1)
    read_until(proc, "received SIGUSR1")
    proc.send_signal(signal.SIGUSR1)   # the same signal again at once: a launcher forwarding it, the same request
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)   # a second signal (of another kind: equal ones can merge in the kernel)
    assert proc.wait(timeout=30) == 143


KILL_MID_WRITE = r"""
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from engine.checkpoint import save_atomic
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


def rank_pid(launcher: int, rank: int) -> int:
    for p in children(launcher):
        if f"RANK={rank}" in Path(f"/proc/{p}/environ").read_text().split("\x00"):
            return p
    raise AssertionError(f"no rank {rank} under {launcher}")


def test_a_hung_rank_stops_the_others_within_dist_timeout(tmp_path):
    # a stopped (not dead) rank: torchrun's monitor sees nothing wrong, only the collective timeout can tell
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="2")
    from engine.distributed import free_port
    proc = launch(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   ROOT / "main_pretrain.py", *TINY, "--epochs", "200", "--log_dir", "", "--dist_timeout", "0.1",
                   "--output_dir", tmp_path / "o"], until="Epoch [0]", env=env, start_new_session=True)
    hung = rank_pid(proc.pid, 1)
    os.kill(hung, signal.SIGSTOP)
    stopped = time.time()
    try:
        rest = proc.stdout.read()
        code = proc.wait(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGKILL)
    assert code != 0 and time.time() - stopped < 150, rest[-3000:]
    assert "rank 0 failed" in rest, rest[-3000:]


def test_torchrun_group_signal_checkpoints_and_a_one_process_resume_continues(reference, tmp_path, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    from engine.distributed import free_port
    out = tmp_path / "o"
    proc = launch(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   ROOT / "main_pretrain.py", *GROUP, "--batch_size", "1", "--output_dir", out],
                  until="Epoch [1]", env=env, start_new_session=True)
    os.killpg(proc.pid, signal.SIGTERM)   # scancel, SLURM's SIGTERM: torchrun, both ranks and their 4 workers
    rest = proc.stdout.read()
    code = proc.wait(timeout=180)
    # The ranks checkpoint and exit 0; torchrun then re-raises the signal it got itself (status 1). The
    # SIGTERM that torchrun forwards to each rank is taken as the same request, not a second signal.
    assert code == 1 and "SignalException" in rest, rest[-3000:]
    assert rest.count("received SIGTERM") == 2 and "second signal" not in rest and "killed by signal" not in rest
    assert "stop signal: checkpoint written at epoch 1" in rest
    ck = safe_load(out / "checkpoint-last.pth")
    assert ck["epoch"] == 1 and ck["next_step"] > 0 and ck["progress"]["world_size"] == 2
    # one process with the same global batch continues at the same sample; the data of every step is then
    # the same as the uninterrupted run's, and the weights differ only by DDP's reduction order (measured:
    # at most 1.5e-4 after 54 steps, AdamW amplifying float differences)
    capsys.readouterr()
    main_pretrain.main(main_pretrain.parse_args(GROUP + ["--num_workers", "0", "--batch_size", "2",
                                                         "--output_dir", str(out)]))
    assert f"continuing at epoch 1, step {ck['progress']['samples'] // 2})" in capsys.readouterr().out
    b = weights(out)
    for k in reference:
        assert torch.allclose(reference[k], b[k], atol=1e-3, rtol=1e-3), k


def test_rank_exception_reaches_the_log_with_its_rank(monkeypatch, capsys):
    from config.cli import run_main
    monkeypatch.setenv("RANK", "3")

    def boom():
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_main(boom)
    assert "rank 3 failed" in capsys.readouterr().err


def test_data_and_file_errors_end_the_program_in_one_line(monkeypatch, capsys):
    from config.cli import run_main
    from errors import DataError
    monkeypatch.setenv("RANK", "1")
    # as torch re-raises an error of a DataLoader worker: the worker's traceback is the message
    worker = DataError("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                       "last):\n  File \"x.py\", line 3, in f\n    raise DataError(m)\nerrors.DataError: "
                       "shard /d/train-000001.tar cannot be read: ReadError: unexpected end of data")
    full = OSError(28, "No space left on device")
    full.filename = "/out/checkpoint-last.pth"
    for error, line in ((worker, "shard /d/train-000001.tar cannot be read: ReadError: unexpected end of data"),
                        (full, "[Errno 28] No space left on device: '/out/checkpoint-last.pth'")):
        def fail():
            raise error
        with pytest.raises(SystemExit) as e:
            run_main(fail)
        assert e.value.code == 1 and capsys.readouterr().err.splitlines()[-1].endswith(f"rank 1: error: {line}")
    with pytest.raises(ConnectionResetError):   # an OSError about no file keeps its traceback
        run_main(lambda: (_ for _ in ()).throw(ConnectionResetError(104, "reset by peer")))


@pytest.mark.parametrize("accum", [1, 2, 3, 4, 8])
def test_ranks_check_for_a_stop_at_least_every_four_optimizer_steps(accum):
    from engine.stop import STOP_CHECK_EVERY, stop_check_due
    steps = 101
    boundaries = [s for s in range(steps) if (s + 1) % accum == 0 or s + 1 == steps]
    due = [s for s in boundaries if stop_check_due(s, accum, steps)]
    assert due[-1] == steps - 1                                # always at the end of an epoch
    gaps = [(b - a) // accum for a, b in zip([-1] + due, due)]
    assert max(gaps) <= STOP_CHECK_EVERY, (accum, due[:6])


def test_stopped_by_names_the_signal_only_once_the_stop_was_honoured(tmp_path):
    """The SLURM wrapper requeues when stopped_by() is SIGUSR2: a signal that arrived but did not end
    the run with a checkpoint must not count, and the next run's flag starts clean."""
    import argparse
    from engine.stop import STOP_SIGNALS, StopRequested, finish_interrupted, setup_stop_signals, stopped_by
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        stop = setup_stop_signals()
        assert stopped_by() is None
        signal.raise_signal(signal.SIGUSR2)
        assert stop() and stop.signum == signal.SIGUSR2 and stopped_by() is None   # requested, not honoured
        args = argparse.Namespace(output_dir=str(tmp_path))
        assert finish_interrupted(StopRequested(0, 0), args, None, None, None, stop) == 0  # nothing to save
        assert stopped_by() == signal.SIGUSR2
        setup_stop_signals()                        # a new run in the same process
        assert stopped_by() is None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_complete_epoch_beats_a_mid_epoch_checkpoint_of_the_same_epoch(tmp_path):
    save_atomic({"model": {}, "epoch": 3, "next_step": 5}, tmp_path / "checkpoint-last.pth")
    save_atomic({"model": {}, "epoch": 3}, tmp_path / "checkpoint-3.pth")
    assert load_latest(tmp_path, log=lambda m: None)[0].name == "checkpoint-3.pth"


def test_shard_sampler_covers_every_item_once():
    from imagedata.datasets import ShardSampler
    parts = [list(ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10)) and [len(p) for p in parts] == [4, 3, 3]


# ---- auto-resume, write order and integrity (in-process, tiny models: fast) ----

import argparse  # noqa: E402

from engine import checkpoint as ckpt_util  # noqa: E402
from errors import CheckpointError  # noqa: E402
from errors import UsageError  # noqa: E402
from engine.state import resume_training_state, save_training_state  # noqa: E402


def state_args(out: Path, **kw) -> argparse.Namespace:
    a = dict(output_dir=str(out), model="lin", epochs=4, batch_size=4, accum_iter=1, world_size=1, keep_last=0,
             resume="", auto_resume=True, start_epoch=0, lr=1e-3, blr=1e-3, warmup_epochs=1, input_size=8,
             allow_changed_args=False)
    a.update(kw)
    return argparse.Namespace(**a)


def tiny(out_features: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, out_features)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    return model, opt


def save_epochs(args, epochs, model=None, opt=None, numbered=True):
    model, opt = (model, opt) if model is not None else tiny()
    for e in epochs:
        save_training_state(args, e, model, opt, None, numbered=numbered, log_record={"epoch": e, "train_loss": 1.0})
    return model, opt


def resume(args, out_features: int = 3):
    lines = []
    model, opt = tiny(out_features, seed=1)
    epoch, step, ckpt = resume_training_state(args, model, opt, None, log=lambda *a, **k: lines.append(" ".join(a)))
    return epoch, step, "\n".join(lines)


class Killed(BaseException):
    """The process dies here."""


@pytest.mark.parametrize("numbered", [True, False])
def test_a_kill_at_any_point_of_a_save_loses_no_file_and_no_log_line(tmp_path, monkeypatch, numbered):
    real_replace = os.replace
    points = (4 if numbered else 2) + 2      # every rename, the log line, and no kill at all
    for k in range(points):
        out = tmp_path / f"kill{k}"
        args = state_args(out)
        model, opt = save_epochs(args, [0, 1], numbered=numbered)
        calls = []

        def dying_replace(a, b):
            if len(calls) == k:
                raise Killed
            calls.append(b)
            real_replace(a, b)

        def dying_open(*a, **kw):
            if len(calls) == k:
                raise Killed
            return open(*a, **kw)
        monkeypatch.setattr(ckpt_util.os, "replace", dying_replace)
        monkeypatch.setattr("engine.state.open", dying_open, raising=False)
        with pytest.raises(Killed) if k < points - 1 else contextlib.nullcontext():
            save_training_state(args, 2, model, opt, None, numbered=numbered, log_record={"epoch": 2})
        monkeypatch.undo()
        (out / ".checkpoint-last.pth.stale.tmp").write_bytes(b"x" * 1000)   # what a SIGKILL mid-write leaves
        epoch, step, log = resume(state_args(out))
        assert "corrupt" not in log and "skipped" not in log, (k, log)
        assert (epoch, step) in ((2, 0), (3, 0)), (k, epoch)
        if epoch == 3 and numbered:
            assert (out / "checkpoint-2.pth").is_file()          # never checkpoint-last ahead of a missing numbered one
        logged = [json.loads(l)["epoch"] for l in (out / "log.txt").read_text().splitlines()]
        assert logged == list(range(epoch)), (k, logged)         # the line of every completed epoch, once
        assert not list(out.glob(".*.tmp")) and "removed 1 temporary file" in log


def test_a_flipped_byte_is_named_and_the_next_good_checkpoint_used(tmp_path):
    args = state_args(tmp_path)
    model, _ = save_epochs(args, [0, 1])
    path = tmp_path / "checkpoint-last.pth"
    data = bytearray(path.read_bytes())
    at = data.find(model.weight.detach().numpy().tobytes()[:64]) + 10   # inside a tensor's data
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    assert safe_load(path)["epoch"] == 1                   # torch itself loads it without complaint
    epoch, step, log = resume(args)
    assert "skipped checkpoint-last.pth" in log and "corrupt" in log and "SHA-256" in log
    assert "resumed from" in log and "checkpoint-1.pth" in log and epoch == 2


def test_candidates_are_ranked_without_loading_them_and_a_branch_outranks_its_old_future(tmp_path, monkeypatch):
    args = state_args(tmp_path, epochs=20)
    model, opt = save_epochs(args, range(8))
    loads = []
    real = ckpt_util.safe_load
    monkeypatch.setattr(ckpt_util, "safe_load", lambda p, **k: loads.append(Path(p).name) or real(p, **k))
    assert resume(args)[0] == 8 and len(loads) == 1       # 9 candidates, one file loaded
    # go back to epoch 2 explicitly, train epoch 3, stop: the next auto-resume continues this branch
    back = state_args(tmp_path, epochs=20, resume=str(tmp_path / "checkpoint-2.pth"))
    model2, opt2 = tiny(seed=1)
    assert resume_training_state(back, model2, opt2, None, log=lambda *a, **k: None)[0] == 3
    save_training_state(back, 3, model2, opt2, None, next_step=2)
    epoch, step, log = resume(state_args(tmp_path, epochs=20))
    assert (epoch, step) == (3, 2) and "checkpoint-last.pth" in log, log
    for p in tmp_path.glob("*.json"):   # files from before sidecars are ranked from their pickle (mmap)
        p.unlink()
    assert resume(state_args(tmp_path, epochs=20))[:2] == (8, 0)


def test_a_checkpoint_that_does_not_fit_is_skipped_with_its_reason(tmp_path):
    args = state_args(tmp_path)
    save_epochs(args, [0])
    save_epochs(args, [1], *tiny(out_features=5), numbered=False)       # one mis-shaped tensor
    epoch, _, log = resume(args)
    assert epoch == 1 and "skipped checkpoint-last.pth" in log and "weight has shape (5, 64)" in log, log
    bad = {**safe_load(tmp_path / "checkpoint-0.pth"), "epoch": "7"}   # a field of the wrong type
    ckpt_util.save_atomic(bad, tmp_path / "checkpoint-9.pth", meta={"epoch": 9})
    epoch, _, log = resume(args)
    assert epoch == 1 and "field 'epoch' is a str" in log, log


def test_another_model_or_changed_flags_are_refused_and_a_finished_run_says_so(tmp_path):
    args = state_args(tmp_path, epochs=2)
    save_epochs(args, [0])
    with pytest.raises(CheckpointError, match="checkpoint of lin, not --model other"):
        resume(state_args(tmp_path, epochs=2, model="other"))
    with pytest.raises(UsageError) as e:
        resume(state_args(tmp_path, epochs=3, blr=2e-3, lr=2e-3, batch_size=8))
    msg = str(e.value)
    assert all(s in msg for s in ("--epochs 2 -> 3", "--blr 0.001 -> 0.002", "effective batch 4 -> 8",
                                  "--allow_changed_args")) and "\n" not in msg, msg
    epoch, _, log = resume(state_args(tmp_path, epochs=3, allow_changed_args=True))
    assert epoch == 1 and "changed flags: --epochs 2 -> 3" in log
    epoch, _, log = resume(state_args(tmp_path, epochs=3, resume=str(tmp_path / "checkpoint-0.pth")))
    assert epoch == 1 and "changed flags" in log
    save_epochs(args, [1])
    epoch, _, log = resume(args)
    assert epoch == 2 and "run already finished" in log


def test_mid_epoch_resume_continues_at_the_same_sample_under_another_batch_or_world_size(tmp_path):
    args = state_args(tmp_path, batch_size=4, world_size=1)
    model, opt = tiny()
    save_training_state(args, 1, model, opt, None, next_step=10)      # 40 samples of epoch 1 consumed
    assert resume(state_args(tmp_path, batch_size=8, allow_changed_args=True))[:2] == (1, 5)
    assert resume(state_args(tmp_path, batch_size=2, world_size=2))[:2] == (1, 10)
    with pytest.raises(CheckpointError, match="after 40 samples.*cannot continue exactly there"):
        resume(state_args(tmp_path, batch_size=3, allow_changed_args=True))


def test_hung_rank_default_is_short_and_documented():
    from config.cli import DIST_TIMEOUT_MIN
    assert main_pretrain.get_args_parser().parse_args([]).dist_timeout == DIST_TIMEOUT_MIN <= 3
    assert f"`--dist_timeout`, {DIST_TIMEOUT_MIN:g} minutes by default" in (ROOT / "PRETRAIN.md").read_text()


# A program run with DataLoader workers (which ignore SIGTERM) whose main process fails, or is killed: started
# through this wrapper, which makes the failure happen where users meet it (an optimizer step, mid-epoch, a
# worker blocked on a read that never returns).
FAILING_RUN = """
import os, runpy, sys, time
import torch, torch.utils.data
how = sys.argv[1]
if how == "raise":
    def step(self, *a, **k):
        raise RuntimeError("injected failure in the main process")
    torch.optim.AdamW.step = step
else:  # a worker blocks as on a hung file system, once it said so
    from imagedata.datasets import SeededImageDataset
    def getitem(self, key):
        if torch.utils.data.get_worker_info() is not None:
            print("worker", os.getpid(), "blocked", flush=True)
            time.sleep(3600)
    SeededImageDataset.__getitem__ = getitem
sys.argv = ["main_pretrain.py", *sys.argv[2:]]
runpy.run_path("main_pretrain.py", run_name="__main__")
"""
WORKERS = TINY + ["--num_workers", "2", "--epochs", "1", "--log_dir", ""]


def test_an_unexpected_error_with_loader_workers_ends_the_process_with_its_traceback(tmp_path):
    from programs import run_to_exit
    code, out, left = run_to_exit(["-c", FAILING_RUN, "raise", *WORKERS, "--output_dir", tmp_path], timeout=90)
    assert code == 1, out[-2000:]          # None: still waiting at exit for the workers
    assert "RuntimeError: injected failure in the main process" in out and "Traceback" in out
    assert left == []


def test_a_killed_main_process_takes_its_workers_with_it(tmp_path):
    from programs import session_members
    proc = subprocess.Popen([PY, "-c", FAILING_RUN, "block", *WORKERS, "--output_dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        read_until(proc, "worker ")
        assert len(session_members(proc.pid)) >= 2
        proc.kill()
        proc.wait()
        wait_for(lambda: session_members(proc.pid) == [], 20, "the workers to end with their parent")
    finally:
        for pid in session_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


GLOO_RANK = """
import os, sys
import torch, torch.distributed as dist
from engine.distributed import cleanup
torch.set_num_threads(1)
threads = lambda: len(os.listdir("/proc/self/task"))
torch.ones(2).add_(1)
before = threads()
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=int(sys.argv[1]), world_size=2)
model = torch.nn.Linear(2, 1)
torch.optim.AdamW(model.parameters())   # imports torch._dynamo, and with it torch.distributed.nn.functional
t = torch.ones(2)
dist.all_reduce(t)
during = threads()
cleanup()
print("threads", before, during, threads(), flush=True)
"""


def test_cleanup_joins_the_process_groups_threads_before_the_interpreter_exits(tmp_path):
    # gloo's threads still running while the interpreter finalizes abort a good run now and then ('terminate
    # called without an active exception'); tools/teardown_stress.py measures how often
    procs = [subprocess.Popen([PY, "-c", GLOO_RANK, str(r), str(tmp_path / "store")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for r in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]   # (a loaded machine imports torch._dynamo slowly)
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    for out, _ in outs:
        before, during, after = map(int, out.split()[-3:])
        assert during > before and after == before, out


# ---- the epoch loop: the trained state before any evaluation, crashes recorded, folders locked ----

import socket  # noqa: E402

from engine.record import RunRecord  # noqa: E402
from engine.run import Run  # noqa: E402
from engine.state import TrainState  # noqa: E402
from engine.step import StepOutput, StepSettings  # noqa: E402
from engine.stop import StopFlag  # noqa: E402
from engine.trainer import Cadence, Evaluation, Periods, Task, Trainer  # noqa: E402


class ToyTask(Task):
    """One optimizer step per epoch on data seeded by the epoch; the 'evaluation' scores the weights."""

    what, best_key = "toy", "best_score"

    def __init__(self, model, crash_in_eval=None):
        self.model, self.crash, self.evals = model, crash_in_eval, []

    def compute_loss(self, batch):
        return StepOutput(self.model(batch).pow(2).mean(), len(batch))

    def evaluate(self, period):
        self.evals.append(period)
        if period == self.crash:
            raise RuntimeError("evaluation crashed")
        score = float(self.model.weight.detach().abs().sum())
        return Evaluation({"score": score}, score, record={"test_score": score})


class ToyLoader:
    def start(self, period, step):
        return [torch.randn(8, 64, generator=torch.Generator().manual_seed(period))]


def toy_run(out: Path, record: str, crash_in_eval=None, **flags):
    args = state_args(out, epochs=3, save_freq=0, exit_after_epoch=-1, seed=0, eval_freq=1, **flags)
    model, opt = tiny()
    state = TrainState(args, model, opt, None, best_key="best_score")
    state.resume(log=lambda *a, **k: None)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(torch.device("cpu"), 0, 1, StopFlag(), RunRecord(out / record, {"program": "toy"}), str(out))
    task = ToyTask(model, crash_in_eval)
    code = Trainer(run, state, task, ToyLoader(), lambda period, step, length: 1e-3, Periods(1, 3),
                   StepSettings(print_every=1000), evaluate=Cadence(1)).fit()
    return code, task, model


def test_a_crash_in_evaluation_loses_no_training_and_the_resume_evaluates_first(tmp_path):
    _, _, reference = toy_run(tmp_path / "ref", "run-001.json")
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        toy_run(out, "run-001.json", crash_in_eval=1)
    ck = safe_load(out / "checkpoint-last.pth")
    read = lambda d: [{k: v for k, v in json.loads(l).items() if k in ("epoch", "train_loss", "test_score")}  # noqa: E731
                      for l in (d / "log.txt").read_text().splitlines()]
    assert ck["epoch"] == 1                                           # epoch 1's training is on disk
    assert ck["evaluation_pending"]["stats"]["loss"] == read(tmp_path / "ref")[1]["train_loss"]
    assert [json.loads(l)["epoch"] for l in (out / "log.txt").read_text().splitlines()] == [0]
    finished = json.loads((out / "run-001.json").read_text())["finished"]
    assert finished["status"] == "crashed" and finished["error"] == "RuntimeError: evaluation crashed"
    code, epochs, model = toy_run(out, "run-002.json")
    assert code == 0 and epochs.evals == [1, 2]            # the interrupted evaluation first, then epoch 2's
    assert torch.equal(model.weight, reference.weight) and torch.equal(model.bias, reference.bias)
    assert read(out) == read(tmp_path / "ref")              # every line once, with its evaluation
    assert safe_load(out / "checkpoint-best.pth")["epoch"] == safe_load(tmp_path / "ref" / "checkpoint-best.pth")["epoch"]
    assert json.loads((out / "run-002.json").read_text())["finished"]["status"] == "completed"


KILL_IN_EVALUATION = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import main_finetune
import engine_finetune
real, calls = engine_finetune.evaluate, []
def dying(*a, **k):
    calls.append(1)
    if len(calls) == 2:                      # the evaluation after epoch 1: a kill that no handler sees
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
engine_finetune.evaluate = dying
main_finetune.main(main_finetune.parse_args({argv!r}))
"""


def test_sigkill_during_evaluation_keeps_the_epoch_and_the_resume_is_exact(tmp_path, capsys):
    import main_finetune
    from tiny_data import make_labelled
    data = make_labelled(tmp_path / "data", per_class=2, size=40)
    argv = ["--model", "swin_pico_128", "--batch_size", "2", "--epochs", "2", "--num_workers", "0", "--device", "cpu",
            "--log_dir", "", "--print_freq", "1000", "--warmup_epochs", "0", "--data_path", str(data)]
    assert main_finetune.main(main_finetune.parse_args(argv + ["--output_dir", str(tmp_path / "ref")])) == 0
    out = tmp_path / "killed"
    args = argv + ["--output_dir", str(out)]
    proc = subprocess.run([PY, "-c", KILL_IN_EVALUATION.format(root=str(ROOT), argv=args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert safe_load(out / "checkpoint-last.pth")["epoch"] == 1          # before: epoch 0, epoch 1 lost
    capsys.readouterr()
    assert main_finetune.main(main_finetune.parse_args(args)) == 0
    text = capsys.readouterr().out
    assert "epoch 1 trained, its evaluation interrupted" in text and "epoch 1: val top-1" in text, text
    a, b = weights(tmp_path / "ref"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(l)["epoch"] for l in (out / "log.txt").read_text().splitlines()] == [0, 1]


HOLDER = r"""
import sys, time
sys.path.insert(0, {root!r})
from engine.output_lock import acquire
acquire(sys.argv[1], "holder")
print("locked", flush=True)
time.sleep(300)
"""


def test_a_second_run_on_a_folder_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    from tiny_data import make_labelled
    out = tmp_path / "out"
    holder = launch(["-c", HOLDER.format(root=str(ROOT)), out], until="locked")
    try:
        for cmd in ([ROOT / "main_pretrain.py", *TINY, "--epochs", "1", "--log_dir", "", "--output_dir", out],
                    [ROOT / "tools" / "make_shards.py", "--data_path", ROOT / "data" / "sample_images",
                     "--output_dir", out]):
            t0 = time.time()
            r = subprocess.run([PY, *map(str, cmd)], capture_output=True, text=True, timeout=120, cwd=ROOT)
            assert r.returncode == 2 and time.time() - t0 < 60, r.stderr
            err = r.stderr.strip().splitlines()[-1]
            assert f"is in use by holder (PID {holder.pid} on host {socket.gethostname()}" in err, r.stderr
            assert "Traceback" not in r.stderr and "usage:" not in r.stderr
        assert sorted(p.name for p in out.iterdir()) == [".lock"]       # nothing written, nothing removed
    finally:
        holder.kill()
        holder.wait()
    src = make_labelled(tmp_path / "src", per_class=2, size=16)
    r = subprocess.run([PY, str(ROOT / "tools" / "make_shards.py"), "--data_path", str(src), "--output_dir", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"took over the lock of {out}: its holder, holder (PID {holder.pid}" in r.stdout
    assert (out / ".lock").read_bytes() == b""                        # released at the end


def test_without_flock_a_pid_file_locks_and_a_dead_holders_file_is_taken_over(tmp_path, monkeypatch):
    import errno
    from engine import output_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(output_lock.fcntl, "flock", no_flock)
    lock = output_lock.acquire(tmp_path, "a")
    assert json.loads((tmp_path / ".lock.pid").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock.pid").exists()
    live = {"program": "other", "pid": os.getppid(), "host": socket.gethostname(), "started": "t"}
    (tmp_path / ".lock.pid").write_text(json.dumps(live))
    with pytest.raises(output_lock.FolderBusy, match=f"in use by other \\(PID {os.getppid()} on host"):
        output_lock.acquire(tmp_path, "a")
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / ".lock.pid").write_text(json.dumps({**live, "pid": int(dead)}))
    notes = []
    output_lock.acquire(tmp_path, "a", log=notes.append).release()
    assert f"holder, other (PID {dead} on host" in notes[0] and "no longer running" in notes[0]


def test_a_checkpoint_write_on_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    # as a full disk fails it: the write raises ENOSPC (no file name), and torch's zip writer then masks
    # it with a RuntimeError ("unexpected pos") when its context manager closes the archive
    from config.cli import run_main
    from engine import checkpoint as ckpt_util
    real_write = ckpt_util._HashingWriter.write

    def write(self, b):
        if self.size > 1000:
            raise OSError(28, "No space left on device")
        return real_write(self, b)
    monkeypatch.setattr(ckpt_util._HashingWriter, "write", write)
    path = tmp_path / "checkpoint-last.pth"
    with pytest.raises(SystemExit) as e:
        run_main(lambda: save_atomic({"model": {"w": torch.zeros(4096)}}, path, meta={"epoch": 0}))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert err[0].endswith(f"error: [Errno 28] No space left on device: '{path}'")
    assert not list(tmp_path.iterdir())  # no temporary file, no sidecar left


def test_a_full_tensorboard_folder_does_not_end_the_run(tmp_path, monkeypatch, capsys):
    class FullDisk:
        calls = 0

        def __init__(self, log_dir):
            pass

        def add_scalar(self, *a):
            FullDisk.calls += 1
            raise OSError(28, "No space left on device")

        flush = close = lambda self: None
    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", FullDisk)
    run = Run(torch.device("cpu"), 0, 1, StopFlag(), RunRecord(None, {}), str(tmp_path), str(tmp_path / "tb"))
    run.open_log_writer()
    for epoch in range(3):
        run.log_writer.add_scalar("epoch/loss", 1.0, epoch)
        run.log_writer.flush()
    run.close_log_writer()
    err = capsys.readouterr().err
    assert FullDisk.calls == 1 and err.count("TensorBoard cannot write to") == 1 and "training goes on" in err


def test_a_tensorboard_folder_full_from_the_start_is_one_warning(tmp_path, monkeypatch, capsys):
    # the real SummaryWriter on a full disk: its first write (the file-version event, in its writer
    # thread) fails inside the constructor, and the thread's own exception would print a traceback
    from tensorboard.summary.writer import record_writer

    def full(self, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    run = Run(torch.device("cpu"), 0, 1, StopFlag(), RunRecord(None, {}), str(tmp_path), str(tmp_path / "tb"))
    run.open_log_writer()
    if run.log_writer is not None:
        run.log_writer.add_scalar("epoch/loss", 1.0, 0)
    run.close_log_writer()
    err = capsys.readouterr().err
    assert err.count("TensorBoard cannot write to") == 1 and "training goes on" in err
    assert "Traceback" not in err and "Exception in thread" not in err


def test_an_epoch_over_the_skip_limit_stops_the_run_with_the_list(tmp_path, capsys):
    from tiny_data import make_images
    data = make_images(tmp_path / "data", n=12, size=32)
    bad = sorted(data.glob("*"))[:3]
    for p in bad:
        p.write_bytes(b"not an image")
    out = tmp_path / "out"
    args = main_pretrain.parse_args(TINY + ["--epochs", "2", "--num_workers", "2", "--log_dir", "", "--data_path",
                                            str(data), "--output_dir", str(out), "--max_skipped", "1"])
    assert main_pretrain.main(args) == 1
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if l.startswith("error:"))
    assert "samples of epoch 0 could not be used (all ranks), more than the limit of 1 (--max_skipped" in line
    assert all(p.name in line for p in bad) and str(out / "skipped-samples.txt") in line, line
    from imagedata.datasets import read_skip_list    # each worker lists what it met (once each)
    assert sorted(n for n, _ in read_skip_list(out / "skipped-samples.txt")) == sorted(map(str, bad))
    assert safe_load(out / "checkpoint-last.pth")["epoch"] == 0      # the epoch trained is kept
    assert json.loads((out / "run-001.json").read_text())["finished"]["status"] == "failed"
    from imagedata.datasets import skip_limit
    assert skip_limit(None, 1000) == 50 and skip_limit(None, 100_000) == 1000 and skip_limit(-1, 10) is None


def test_a_full_or_too_deep_output_folder_is_one_line_at_start(tmp_path, monkeypatch):
    from engine import output_lock
    from engine import record as run_record

    @dataclasses.dataclass(frozen=True)
    class Where:
        output_dir: str
        launch_command: tuple = ()
    deep = tmp_path
    while len(str(deep)) < 4068:        # (S3: a checkpoint's temporary name no longer fits in PATH_MAX)
        deep = deep / ("d" * min(200, 4067 - len(str(deep))))
    deep.mkdir(parents=True)
    with pytest.raises(UsageError, match="too long for the run's file names"):
        output_lock.acquire(deep, "x")
    monkeypatch.setattr(run_record, "_write_json", lambda path, obj: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(UsageError, match="cannot write the run record in .*: No space left on device"):
        RunRecord.start(Where(str(tmp_path / "full")), "x", torch.device("cpu"))
    assert not list((tmp_path / "full").glob("run-*.json"))


def test_a_run_that_fails_outside_the_loop_still_closes_its_record(tmp_path):
    out = tmp_path / "out"
    save_epochs(state_args(out), [0])                  # a checkpoint of another model ("lin") in the folder
    r = subprocess.run([PY, str(ROOT / "main_pretrain.py"), *TINY, "--epochs", "1", "--log_dir", "", "--output_dir",
                        str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1 and "is a checkpoint of lin, not --model mae_swin_pico_128" in r.stderr, r.stderr
    finished = json.loads((out / "run-001.json").read_text())["finished"]
    assert finished["status"] == "failed" and "ended before the run finished" in finished["error"]


def test_a_resume_under_another_thread_count_says_the_weights_will_differ_in_the_last_bits(tmp_path):
    """The stop-and-resume test above is bit-exact at one thread count; a user resuming on a node with
    another count is told why the continuation cannot be bit-identical (and how to make it so)."""
    import argparse
    from engine.state import resume_training_state, save_training_state
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    flags = argparse.Namespace(output_dir=str(tmp_path), batch_size=2, accum_iter=1, model="m", epochs=3,
                               keep_last=0, device="cpu", resume="", auto_resume=True, start_epoch=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        save_training_state(flags, 0, model, opt, None, next_step=3)
        for count, expect_note in ((2, False), (1, True)):
            torch.set_num_threads(count)
            lines = []
            epoch, step, _ = resume_training_state(flags, model, opt, None, log=lambda m, **k: lines.append(m))
            assert (epoch, step) == (0, 3)
            notes = [m for m in lines if "intra-op threads" in m]
            assert bool(notes) == expect_note, lines
        assert "written with 2 intra-op threads and this run uses 1" in notes[0]
        assert "OMP_NUM_THREADS=2" in notes[0]
    finally:
        torch.set_num_threads(threads)
