"""Feature monitors during pretraining (engine/monitor.py): the offline k-NN's numbers, no training
RNG consumed, the best-monitor checkpoint, two gloo ranks, the closed-form probe and the seeded split."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_finetune
import main_pretrain
from engine.checkpoint import safe_load
from engine.monitor import ridge_probe, split_monitor_set
from errors import UsageError
from programs import run_to_exit
from tiny_data import make_images

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "mae_swin_pico_128", "--mask_regular", "--num_workers", "0", "--print_freq", "1000",
        "--device", "cpu", "--batch_size", "4", "--warmup_epochs", "1", "--lr", "1e-3", "--log_dir", ""]


def random_classes(root: Path, classes: int = 4, train: int = 5, val: int = 3, split: bool = True) -> Path:
    """Classes of unrelated smooth noise: k-NN and probe accuracies well away from 0 and 100%."""
    for c in range(classes):
        if split:
            make_images(root / "train" / f"c{c}", n=train, size=64, seed=10 * c)
            make_images(root / "val" / f"c{c}", n=val, size=64, seed=10 * c + 5)
        else:
            make_images(root / f"c{c}", n=train + val, size=64, seed=10 * c)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("photos"), n=8)


@pytest.fixture(scope="module")
def monitor_set(tmp_path_factory):
    return random_classes(tmp_path_factory.mktemp("monitor"))


def run(argv):
    assert main_pretrain.main(main_pretrain.parse_args(argv)) == 0


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_monitor_equals_offline_knn_of_the_checkpoint_and_reaches_every_output(tmp_path, data, monitor_set, one_thread):
    out = tmp_path / "out"
    # DataLoader workers for the training and the monitor's loaders, as users run it
    run(TINY + ["--data_path", str(data), "--epochs", "2", "--output_dir", str(out), "--log_dir", str(out / "tb"),
                "--monitor_data", str(monitor_set), "--monitor_freq", "5", "--num_workers", "1"])
    lines = log_lines(out)
    assert "monitor_knn_acc1" not in lines[0]           # epoch 0 is no monitor point; the last epoch always is
    last = lines[-1]
    knn_out = tmp_path / "knn"
    args = main_finetune.parse_args(["--knn", "--finetune", str(out / "checkpoint-last.pth"), "--data_path",
                                     str(monitor_set), "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
                                     "--output_dir", str(knn_out), "--log_dir", ""])
    assert main_finetune.main(args) == 0
    offline = json.loads((knn_out / "knn.json").read_text())
    assert (last["monitor_knn_acc1"], last["monitor_knn_acc5"]) == (offline["acc1"], offline["acc5"])
    assert 0 < last["monitor_probe_acc1"] <= 100
    record = json.loads((out / "run-001.json").read_text())["finished"]
    assert record["monitor"]["last"]["monitor_knn_acc1"] == offline["acc1"] and record["monitor"]["last"]["epoch"] == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"]
    assert {"monitor/knn_acc1", "monitor/probe_acc1"} <= set(tags)


def test_monitors_consume_no_training_rng_and_resume_exactly(tmp_path, data, monitor_set, one_thread):
    common = TINY + ["--data_path", str(data), "--epochs", "3"]
    run(common + ["--output_dir", str(tmp_path / "plain")])
    watched = common + ["--output_dir", str(tmp_path / "watched"), "--monitor_data", str(monitor_set),
                        "--monitor_freq", "1"]
    run(watched + ["--exit_after_epoch", "0"])
    run(watched)                                                     # auto-resume
    a = safe_load(tmp_path / "plain" / "checkpoint-last.pth")["model"]
    b = safe_load(tmp_path / "watched" / "checkpoint-last.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [l["train_loss"] for l in log_lines(tmp_path / "plain")] == \
        [l["train_loss"] for l in log_lines(tmp_path / "watched")]
    assert all("monitor_knn_acc1" in l for l in log_lines(tmp_path / "watched"))


def test_save_best_monitor_keeps_the_checkpoint_of_the_best_knn(tmp_path, data, monitor_set, one_thread):
    out = tmp_path / "out"
    run(TINY + ["--data_path", str(data), "--epochs", "3", "--lr", "1e-2", "--output_dir", str(out),
                "--monitor_data", str(monitor_set), "--monitor_freq", "1", "--save_best_monitor"])
    scores = [l["monitor_knn_acc1"] for l in log_lines(out)]
    best = safe_load(out / "checkpoint-best.pth")
    assert best["monitor_best"] == max(scores) and best["epoch"] == scores.index(max(scores))


def test_save_best_monitor_without_monitor_data_is_a_usage_error(data, tmp_path):
    with pytest.raises(UsageError, match="--monitor_data"):
        main_pretrain.parse_args(TINY + ["--data_path", str(data), "--save_best_monitor",
                                         "--output_dir", str(tmp_path)])
    with pytest.raises(UsageError, match="monitor_data"):
        main_pretrain.parse_args(TINY + ["--data_path", str(data), "--monitor_data", str(tmp_path / "none"),
                                         "--output_dir", str(tmp_path)])


def test_two_gloo_ranks_monitor_as_one_process_would(tmp_path, data, monitor_set):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    port = str(__import__("engine.distributed", fromlist=["free_port"]).free_port())
    argv = [a for a in TINY if a != "4"]
    argv[argv.index("--batch_size") + 1:argv.index("--batch_size") + 1] = ["2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(ROOT / "main_pretrain.py"), *argv, "--data_path", str(data),
                           "--epochs", "1", "--output_dir", str(out), "--monitor_data", str(monitor_set)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "monitor (epoch 0): k-NN top-1" in proc.stdout
    logged = log_lines(out)[-1]
    # the same weights monitored by one process, with the same batch size per forward
    import models
    from engine.monitor import FeatureMonitor
    model = models.create_model("mae_swin_pico_128")
    model.load_state_dict(safe_load(out / "checkpoint-last.pth")["model"])
    single = FeatureMonitor(model, "mae_swin_pico_128", str(monitor_set), 128, 2, 0, 0, torch.device("cpu"), 1, 0)(0)
    one_image = 100 / single.num_val + 1e-9   # a row's features may differ in the last bit with its batch mates
    assert abs(logged["monitor_knn_acc1"] - single.knn_acc1) < one_image
    assert abs(logged["monitor_probe_acc1"] - single.probe_acc1) < one_image


def test_closed_form_probe_matches_refitting_without_each_sample():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    xv, yv = torch.randn(9, 6, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    grid = (1e-3, 1e-1, 1.0, 10.0)
    # the probe centres features and labels once, on the whole train split, then fits without intercept
    mean, oh = x.double().mean(0), torch.nn.functional.one_hot(y, 3).double()
    xc, ym = x.double() - mean, oh.mean(0)
    yc = oh - ym
    scale = float(torch.linalg.eigvalsh(xc.T @ xc).clamp(min=0).mean())

    def weights(keep, lam):   # ridge solved directly on the kept rows
        a, b = xc[keep], yc[keep]
        return torch.linalg.solve(a.T @ a + lam * torch.eye(6, dtype=torch.float64), a.T @ b)

    loo = {}
    for rel in grid:
        hits = 0
        for i in range(len(x)):
            keep = torch.arange(len(x)) != i
            hits += int((xc[i] @ weights(keep, rel * scale)).argmax().item() == y[i])
        loo[rel] = hits
    acc, chosen = ridge_probe(x, y, xv, yv, 3, grid)
    assert chosen == max((r for r in grid if loo[r] == max(loo.values())))    # ties: the stronger
    w = weights(torch.ones(len(x), dtype=torch.bool), chosen * scale)
    expected = 100 * float((((xv.double() - mean) @ w + ym).argmax(1) == yv).double().mean())
    assert acc == pytest.approx(expected)


def test_one_folder_of_classes_is_split_once_by_seed(tmp_path):
    root = random_classes(tmp_path / "flat", classes=3, train=4, val=1, split=False)
    train, val = split_monitor_set(str(root), seed=0)
    again = split_monitor_set(str(root), seed=0)
    assert train.samples == again[0].samples and val.samples == again[1].samples
    assert not set(train.samples) & set(val.samples) and len(train) + len(val) == 15
    assert sorted({label for _, label in val.samples}) == [0, 1, 2]   # every class in val
    assert split_monitor_set(str(root), seed=1)[1].samples != val.samples
    assert split_monitor_set(str(random_classes(tmp_path / "split")), seed=0) is None


def test_building_and_running_a_monitor_moves_no_global_generator(monitor_set, one_thread):
    import random

    import numpy as np

    import models
    from engine.monitor import FeatureMonitor
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    model = models.create_model("mae_swin_pico_128")
    torch.set_rng_state(before[0])
    FeatureMonitor(model, "mae_swin_pico_128", str(monitor_set), 128, 4, 0, 0, torch.device("cpu"), 1, 0)(0)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and (np.random.get_state()[1] == before[2]).all()


def test_reconstruction_panels_reach_tensorboard_every_vis_freq_epochs_on_the_same_images(tmp_path, data, one_thread):
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    run(TINY + ["--data_path", str(data), "--epochs", "3", "--vis_freq", "2", "--output_dir", str(out),
                "--log_dir", str(out / "tb")])
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload().Images("reconstruction")
    assert [e.step for e in events] == [1, 2]          # epoch 1 (every 2) and the last epoch
    for e in events:   # the TensorBoard panel is the PNG figure of that epoch
        panel = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        assert np.array_equal(panel, np.asarray(Image.open(out / f"reconstruction-{e.step}.png").convert("RGB")))


def test_cost_report_counts_flops_as_torch_does_and_its_utilisation_adds_up(tmp_path, data, one_thread):
    out = tmp_path / "out"
    run(TINY + ["--data_path", str(data), "--epochs", "2", "--vis_mask_ratio", "0.25", "--batch_size", "3",
                "--output_dir", str(out)])
    record = json.loads((out / "run-001.json").read_text())
    per_image = record["cost"]["flops_per_image"]
    # an independent count: tools/benchmark.py's flop counter over one training step of --batch_size images
    import models
    from models.masking import uniform_mask, secondary_mask
    from tools.benchmark import count_flops
    model = models.create_model("mae_swin_pico_128", vis_mask_ratio=0.25)
    gen = torch.Generator().manual_seed(1)
    mask = uniform_mask(3, model.token_size, generator=gen)
    flops = count_flops(model, torch.randn(3, 3, 128, 128), mask, secondary_mask(mask, 0.25, generator=gen), "none",
                        torch.device("cpu"))
    assert per_image == round(flops / 3)
    peak = record["cost"]["peak_flops_per_device"]
    for line in log_lines(out):
        assert line["train_flops_per_s"] == pytest.approx(line["train_images_per_sec"] * per_image)
        assert line["train_mfu"] == pytest.approx(line["train_flops_per_s"] / peak)
        epoch_s = 6 / line["train_images_per_sec"]       # 2 steps of 3 images
        assert line["train_projected_run_wall_s"] == pytest.approx(2 * epoch_s)
        assert line["train_device_hours_per_100_epochs"] == pytest.approx(100 * epoch_s / 3600)
    assert record["finished"]["cost"]["mfu"] == pytest.approx(log_lines(out)[-1]["train_mfu"])


def poison_forward(monkeypatch, bad_calls):
    """The pretraining forward returns a NaN loss on the given training calls (counted from 1; the two
    calls of the start-up FLOP count are not counted)."""
    import models.mae as mae
    original, calls = mae._PyramidMAE.forward, {"n": 0}

    def poisoned(self, imgs, mask, sm_mask=None):
        out = original(self, imgs, mask, sm_mask)
        calls["n"] += 1
        return out._replace(loss=out.loss * float("nan")) if bad_calls(calls["n"] - 2) else out
    monkeypatch.setattr(mae._PyramidMAE, "forward", poisoned)


def test_a_nan_rolls_the_epoch_back_skips_its_steps_and_the_run_finishes(tmp_path, data, monkeypatch, capsys,
                                                                         one_thread):
    out = tmp_path / "out"
    poison_forward(monkeypatch, lambda n: n == 4)      # epoch 1, step 1 (2 steps an epoch)
    run(TINY + ["--data_path", str(data), "--epochs", "3", "--output_dir", str(out), "--on_nonfinite", "rollback"])
    text = capsys.readouterr().out
    assert "non-finite loss (nan) at epoch 1, step 1: rolled back to epoch 1, step 0" in text
    assert "without micro-steps 0-1" in text
    weights = safe_load(out / "checkpoint-last.pth")
    assert weights["epoch"] == 2 and all(torch.isfinite(v).all() for v in weights["model"].values())
    lines = log_lines(out)
    assert [l["epoch"] for l in lines] == [0, 1, 2] and lines[1]["train_rollbacks"] == 1
    finished = json.loads((out / "run-001.json").read_text())["finished"]
    assert finished["status"] == "completed" and finished["rollbacks"][0]["epoch"] == 1


def test_rollbacks_are_bounded_then_the_run_stops_as_without_them(tmp_path, data, monkeypatch, capsys, one_thread):
    out = tmp_path / "out"
    poison_forward(monkeypatch, lambda n: n >= 5)       # every step from epoch 1 on (4 steps an epoch)
    args = main_pretrain.parse_args(TINY + ["--data_path", str(data), "--epochs", "3", "--output_dir", str(out),
                                            "--batch_size", "2",
                                            "--on_nonfinite", "rollback", "--max_rollbacks", "2"])
    assert main_pretrain.main(args) == 1
    captured = capsys.readouterr()
    assert captured.out.count("rolled back to epoch 1") == 2
    assert "2 rollbacks spent (--max_rollbacks 2); stopping" in captured.err
    assert safe_load(out / "checkpoint-last.pth")["epoch"] == 0


def test_cost_tool_counts_as_the_program_and_fits_the_batch_to_memory(capsys):
    from tools import cost
    from tools.benchmark import count_flops
    import models
    from models.masking import uniform_mask
    report = cost.main(["mae_swin_pico_128", "--batch_size", "4", "--amp", "none", "--gpu_memory_gb", "1"])
    row = report["rows"][0]
    model = models.create_model("mae_swin_pico_128")
    mask = uniform_mask(4, model.token_size, generator=torch.Generator().manual_seed(0))
    assert row["flops_per_image"] == round(count_flops(model, torch.randn(4, 3, 128, 128), mask, None, "none",
                                                       torch.device("cpu")) / 4)
    room = 2 ** 30 - 16 * row["params"]
    assert row["largest_batch"] == int(room // row["saved_bytes_per_image"])
    assert "| mae_swin_pico_128 | 128 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="valid: .*mae_swin_tiny_256"):
        cost.main(["mae_swin_nano"])


POISONED_RANKS = '''
import os, sys
from pathlib import Path
import torch
sys.path.insert(0, {root!r})
import engine_pretrain, main_pretrain
from engine.trainer import Trainer

rank, calls = int(os.environ["RANK"]), {{"n": 0}}
original_loss, original_fit = engine_pretrain.PretrainTask.compute_loss, Trainer.fit

def compute_loss(self, batch):   # a NaN loss on this rank's training calls listed for it
    out = original_loss(self, batch)
    calls["n"] += 1
    return out._replace(loss=out.loss * float("nan")) if calls["n"] in {bad!r}.get(rank, ()) else out

def fit(self):                   # each rank's weights as it ends
    code = original_fit(self)
    torch.save(self.state.model.state_dict(), Path({out!r}) / f"weights-rank{{rank}}.pt")
    return code

engine_pretrain.PretrainTask.compute_loss, Trainer.fit = compute_loss, fit
sys.exit(main_pretrain.main(main_pretrain.parse_args()))
'''


def test_two_gloo_ranks_roll_back_together_when_one_rank_sees_a_nan(tmp_path, data):
    """Rank 1 alone meets a NaN on the last step of epoch 1 (rank 0's loss there is finite: the update
    that would spread it has not happened yet). Both ranks must roll back, retrain the epoch the same
    way and end with equal, finite weights; a rank deciding alone would leave the other waiting in
    its next collective."""
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "poisoned_ranks.py"
    script.write_text(POISONED_RANKS.format(root=str(ROOT), bad={1: (4,)}, out=str(out)))  # 2 steps an epoch
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    port = str(__import__("engine.distributed", fromlist=["free_port"]).free_port())
    argv = [a for a in TINY if a != "4"]
    argv[argv.index("--batch_size") + 1:argv.index("--batch_size") + 1] = ["2"]
    code, output, left = run_to_exit(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                                      script, *argv, "--data_path", data, "--epochs", "3", "--output_dir", out,
                                      "--on_nonfinite", "rollback"], timeout=180, env=env)
    assert code is not None, "the ranks hung (killed after 180 s):\n" + output[-3000:]
    assert code == 0 and not left, output[-3000:]
    assert output.count("rolled back to epoch 1, step 0") == 1, output[-3000:]
    w0, w1 = (torch.load(out / f"weights-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.isfinite(v).all() for v in w0.values())
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    saved = safe_load(out / "checkpoint-last.pth")
    assert saved["epoch"] == 2 and all(torch.equal(saved["model"][k], w0[k]) for k in w0)
    finished = json.loads((out / "run-001.json").read_text())["finished"]
    assert finished["status"] == "completed" and [r["epoch"] for r in finished["rollbacks"]] == [1]


def step_lrs(text: str) -> dict:
    """{(epoch, step): lr} of the progress lines (the last line of each step: after a rollback, its retraining)."""
    return {(int(e), int(s) - 1): float(lr) for e, s, lr in
            re.findall(r"Epoch \[(\d+)\] \[(\d+)/\d+\] .*? lr ([0-9.e+-]+) ", text)}


def test_a_rollback_lowers_the_lr_for_its_window_and_a_resume_keeps_it(tmp_path, data, monkeypatch, capsys,
                                                                       one_thread):
    """4 steps an epoch; a NaN at epoch 1, step 2 skips steps 1-2 and lowers the lr for 6 optimizer
    steps from epoch 1, step 0: the rest of epoch 1 and the first 2 steps of epoch 2."""
    import models.mae as mae
    original, poison = mae._PyramidMAE.forward, {"at": 7, "n": 0}

    def poisoned(self, imgs, mask, sm_mask=None):   # training calls counted from 1 in each run (after 2 for FLOPs)
        out = original(self, imgs, mask, sm_mask)
        poison["n"] += 1
        return out._replace(loss=out.loss * float("nan")) if poison["n"] - 2 == poison["at"] else out
    monkeypatch.setattr(mae._PyramidMAE, "forward", poisoned)
    base = TINY + ["--data_path", str(data), "--epochs", "3", "--batch_size", "2", "--print_freq", "1",
                   "--on_nonfinite", "rollback"]
    lowered = ["--rollback_lr_scale", "0.1", "--rollback_lr_window", "6"]
    run(base + ["--output_dir", str(tmp_path / "plain")])
    plain = step_lrs(capsys.readouterr().out)
    poison["n"] = 0
    run(base + lowered + ["--output_dir", str(tmp_path / "low")])
    text = capsys.readouterr().out
    assert "lr x 0.1 for 6 optimizer steps from epoch 1, step 0" in text
    low = step_lrs(text)
    window = {(1, 0), (1, 3), (2, 0), (2, 1)}                  # trained steps inside it (1-2 were skipped)
    assert set(low) == set(plain) and window < set(low)
    for key, lr in low.items():
        assert lr == pytest.approx(plain[key] * (0.1 if key in window else 1.0), rel=2e-3), key
    record = json.loads((tmp_path / "low" / "run-001.json").read_text())["finished"]["rollbacks"][0]
    assert record["lr_window"] == {"start": 4, "end": 10, "scale": 0.1} and record["skipped"] == [1, 3]
    # the same run stopped after epoch 1 (inside the window) and resumed: the same weights
    poison["n"] = 0
    run(base + lowered + ["--output_dir", str(tmp_path / "cut"), "--exit_after_epoch", "1"])
    poison["at"] = None
    run(base + lowered + ["--output_dir", str(tmp_path / "cut")])
    capsys.readouterr()
    whole, cut = (safe_load(tmp_path / name / "checkpoint-last.pth") for name in ("low", "cut"))
    assert whole["rollback_lr_window"] == {"start": 4, "end": 10, "scale": 0.1}
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])


@pytest.mark.parametrize("flags, message", [
    (["--rollback_lr_scale", "0.5"], "needs both"),
    (["--rollback_lr_scale", "0.5", "--rollback_lr_window", "10", "--on_nonfinite", "stop"], "--on_nonfinite rollback"),
    (["--rollback_lr_scale", "2", "--rollback_lr_window", "10", "--on_nonfinite", "rollback"], "rollback_lr_scale"),
])
def test_a_lowered_lr_after_rollbacks_needs_its_flags_together(data, tmp_path, flags, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        main_pretrain.parse_args(TINY + ["--data_path", str(data), "--output_dir", str(tmp_path), *flags])
