"""Does pretraining with this framework pay off? A small replica of the paper's comparison (FINETUNE.md).

Real images (animal-mnist: 10,000 28x28 silhouettes, 10 classes, written once as 32-px
ImageNet-layout folders by imagedata/animal_mnist.py), real programs run as subprocesses:

  1. pretrain every arm on the 8,000 unlabelled pretraining images for the same number of epochs
     (main_pretrain.py), recording wall time and process CPU time (user + system of the process
     and its workers, from wait4: the fairer cost on a shared machine);
  2. for every encoder (and for randomly initialised ones: the "scratch" arm) on the labelled
     subsets: k-NN (main_finetune.py --knn), linear probe (main_linprobe.py) and finetuning
     (main_finetune.py) with an equal budget of optimizer steps at every label budget;
  3. top-1 on the 2,000 held-out images at the END of training (never the best epoch: that
     would select on the test split), mean +- std over seeds; results.json and two figures.

    python tools/experiment.py --out work_dirs/experiment                 # the table in FINETUNE.md
    python tools/experiment.py --out work_dirs/experiment --phase dev \
        --arms scratch_swin ummae_swin --seeds 0 --tag blr16 --blr 1.6e-2  # a recipe check on dev/
    python tools/experiment.py --out work_dirs/experiment --merge \
        --arms scratch_mixmim3 mixmae_mixmim3                              # add arms to results.json
    python tools/experiment.py --out work_dirs/experiment --phase monitor # feature monitors during pretraining
    python tools/experiment.py --out /tmp/smoke --smoke                   # pipeline check, ~1 min

Finished runs are reused (their result files are kept), so an interrupted run continues where it
stopped. ``--phase dev`` finetunes on dev/train and validates on dev/val (both carved out of the
labelled pretraining images, never the test split) and appends a record to dev_results.jsonl;
every choice of the recipe below was made that way. ``--phase monitor`` pretrains UM-MAE Swin as in
the table with the feature monitors (``--monitor_data`` on l50/train, split by the monitor itself into
bank and queries; ``--monitor_freq``, default 1 here) beside the same run without them, and checks the
monitor's last k-NN against ``main_finetune.py --knn`` of the final checkpoint on that same split.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imagedata.animal_mnist import write_split  # noqa: E402


@dataclass(frozen=True)
class Arm:
    name: str
    pretrain_model: str | None          # None: no pretraining (random initialisation)
    classifier: str
    pretrain_flags: tuple[str, ...] = ()
    headline: bool = True
    family: str = "swin"


ARMS = [
    Arm("scratch_swin", None, "swin_pico_p1_32"),
    Arm("scratch_pvt", None, "pvt_pico_p1_32", family="pvt"),
    Arm("ummae_swin", "mae_swin_pico_p1_32", "swin_pico_p1_32",
        ("--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss")),
    Arm("ummae_pvt", "mae_pvt_pico_p1_32", "pvt_pico_p1_32",
        ("--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss"), family="pvt"),
    Arm("simmim_swin", "simmim_swin_pico_p1_32", "swin_pico_p1_32", ("--mask_ratio", "0.75")),
    Arm("simmim_pvt", "simmim_pvt_pico_p1_32", "pvt_pico_p1_32", ("--mask_ratio", "0.75"), family="pvt"),
    Arm("scratch_vit", None, "vit_pico_patch4_32", headline=False, family="vit"),
    Arm("mae_vit", "mae_vit_pico_patch4_32", "vit_pico_patch4_32", ("--mask_ratio", "0.75", "--norm_pix_loss"),
        headline=False, family="vit"),
    Arm("ummae_vit", "mae_vit_pico_patch4_32", "vit_pico_patch4_32",
        ("--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss"), headline=False, family="vit"),
    Arm("scratch_swin3", None, "swin_pico3_patch1_window8_32", headline=False, family="swin3"),
    Arm("greenmim_swin3", "greenmim_swin_pico3_p1_win8_32", "swin_pico3_patch1_window8_32",
        ("--mask_ratio", "0.75", "--norm_pix_loss"), headline=False, family="swin3"),
    Arm("scratch_hiera", None, "hiera_pico_p1_32", headline=False, family="hiera"),
    Arm("mae_hiera", "mae_hiera_pico_p1_32", "hiera_pico_p1_32", ("--mask_ratio", "0.6", "--norm_pix_loss"),
        headline=False, family="hiera"),
    Arm("scratch_mixmim3", None, "mixmim_pico3_p1_32_cls", headline=False, family="mixmim3"),
    Arm("mixmae_mixmim3", "mixmim_pico3_p1_32", "mixmim_pico3_p1_32_cls", ("--mask_ratio", "0.5", "--norm_pix_loss"),
        headline=False, family="mixmim3"),
]
# GreenMIM's and MixMAE's mask unit is the stride of the last Swin stage, so their 32-px arms are
# 3-stage patch-1 Swins (8x8 units), each with a scratch arm of the same classifier.


@dataclass
class Config:
    out: Path
    pretrain_epochs: int = 10
    pretrain_batch: int = 128
    pretrain_blr: float = 6e-3         # dev, UM-MAE Swin finetune: 67.3 (6e-3) vs 61.2 (1.5e-3), 65.7 (1.2e-2)
    ft_steps: int = 240                # optimizer steps of every finetuning run, at every label budget
    ft_batch: int = 32
    blr: float = 1.6e-2                # pretrained arms (dev: 61.2 vs 58.1 at 4e-3, UM-MAE Swin)
    scratch_blr: float = 4e-3          # scratch arms (dev: 58.5 vs 57.2 at 1.6e-2): each at its better lr
    lp_lr: float = 6.4                 # LARS, absolute (MAE's lr at batch 16384; LARS steps are scale-free)
    layer_decay: float = 0.85
    drop_path: float = 0.1
    min_crop_scale: float = 0.35
    lp_epochs: int = 30
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[int, ...] = (10, 50, 200)
    main_budget: int = 50
    jobs: int = 2
    threads: int = 1
    tag: str = ""                      # names a recipe variant's run folders (dev phase)
    data_kwargs: dict = field(default_factory=dict)


def smoke_config(out: Path) -> Config:
    return Config(out=out, pretrain_epochs=1, pretrain_batch=16, ft_steps=2, ft_batch=8, lp_epochs=1,
                  seeds=(0,), budgets=(2, 4, 6), main_budget=4, jobs=2,
                  data_kwargs=dict(budgets=(2, 4, 6), pretrain_per_class=6, test_per_class=2))


def run_timed(cmd: list[str], out_dir: Path, threads: int) -> dict:
    """Run one program; return its wall time and CPU time (user + sys of it and its workers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(out_dir / "stdout.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    rec = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
           "returncode": os.waitstatus_to_exitcode(status), "command": " ".join(cmd)}
    if rec["returncode"] != 0:
        tail = (out_dir / "stdout.txt").read_text().splitlines()[-5:]
        raise RuntimeError(f"{cmd[1]} failed ({rec['returncode']}) in {out_dir}:\n" + "\n".join(tail))
    (out_dir / "time.json").write_text(json.dumps(rec))
    return rec


def common(cfg: Config, out_dir: Path) -> list[str]:
    return ["--device", "cpu", "--num_workers", "0", "--log_dir=", "--print_freq", "50", "--output_dir", str(out_dir)]


def pretrain_job(cfg: Config, arm: Arm, run_name: str = "", extra: tuple[str, ...] = ()):
    """``run_name``: the run folder under pretrain/ (default: the arm's); ``extra``: flags added to the
    arm's pretraining command (the monitor phase's run is the table's run plus its monitor flags)."""
    out = cfg.out / "pretrain" / (run_name or arm.name)
    ckpt = out / "checkpoint-last.pth"

    def run():
        if (out / "time.json").is_file() and ckpt.is_file():
            return json.loads((out / "time.json").read_text())
        cmd = [sys.executable, "main_pretrain.py", "--model", arm.pretrain_model, *arm.pretrain_flags,
               "--data_path", str(cfg.out / "data" / "pretrain"), "--batch_size", str(cfg.pretrain_batch),
               "--epochs", str(cfg.pretrain_epochs), "--warmup_epochs", "1", "--blr", str(cfg.pretrain_blr),
               "--weight_decay", "0.05", "--vis_freq", "0", "--save_freq", "0", "--seed", "0", *extra,
               *common(cfg, out)]
        return run_timed(cmd, out, cfg.threads)
    return run


def weights(cfg: Config, arm: Arm, run_name: str = "") -> list[str]:
    if arm.pretrain_model is None:
        return []
    return ["--finetune", str(cfg.out / "pretrain" / (run_name or arm.name) / "checkpoint-last.pth")]


def last_top1(out: Path) -> float:
    rows = [json.loads(l) for l in (out / "log.txt").read_text().splitlines() if l.strip()]
    return [r for r in rows if "test_acc1" in r][-1]["test_acc1"]


def finetune_job(cfg: Config, arm: Arm, budget: int, seed: int, data: str = ""):
    data = data or f"l{budget}"
    out = cfg.out / "eval" / arm.name / f"finetune_{data}{'_' + cfg.tag if cfg.tag else ''}_seed{seed}"
    n_train = budget * 10
    batch = min(cfg.ft_batch, n_train)
    epochs = max(1, math.ceil(cfg.ft_steps / (n_train // batch)))

    def run():
        if not (out / "time.json").is_file():
            cmd = [sys.executable, "main_finetune.py", "--model", arm.classifier, "--nb_classes", "10",
                   "--data_path", str(cfg.out / "data" / data), *weights(cfg, arm),
                   "--batch_size", str(batch), "--epochs", str(epochs),
                   "--warmup_epochs", str(max(1, round(0.1 * epochs))),
                   "--blr", str(cfg.blr if arm.pretrain_model else cfg.scratch_blr),
                   "--layer_decay", str(cfg.layer_decay if arm.pretrain_model else 1.0),
                   "--weight_decay", "0.05", "--drop_path", str(cfg.drop_path), "--aa", "none", "--reprob", "0",
                   "--smoothing", "0.1", "--min_crop_scale", str(cfg.min_crop_scale), "--eval_freq", str(epochs),
                   "--save_freq", "0", "--seed", str(seed), "--no_auto_resume", *common(cfg, out)]
            run_timed(cmd, out, cfg.threads)
        return {"top1": last_top1(out), "epochs": epochs, "batch": batch,
                "time": json.loads((out / "time.json").read_text())}
    return run


def knn_job(cfg: Config, arm: Arm, data: str, run_name: str = ""):
    """``run_name``: the pretraining run whose final checkpoint is evaluated (default: the arm's)."""
    out = cfg.out / "eval" / (run_name or arm.name) / f"knn_{data}"

    def run():
        if not (out / "knn.json").is_file():
            cmd = [sys.executable, "main_finetune.py", "--knn", "--model", arm.classifier, "--nb_classes", "10",
                   "--data_path", str(cfg.out / "data" / data), *weights(cfg, arm, run_name), "--batch_size", "250",
                   "--knn_k", "20", "--seed", "0", *common(cfg, out)]
            run_timed(cmd, out, cfg.threads)
        return {"top1": json.loads((out / "knn.json").read_text())["acc1"]}
    return run


def linprobe_job(cfg: Config, arm: Arm, data: str):
    out = cfg.out / "eval" / arm.name / f"linprobe_{data}"

    def run():
        if not (out / "time.json").is_file():
            cmd = [sys.executable, "main_linprobe.py", "--model", arm.classifier, "--nb_classes", "10",
                   "--data_path", str(cfg.out / "data" / data), *weights(cfg, arm),
                   "--batch_size", str(cfg.ft_batch), "--epochs", str(cfg.lp_epochs), "--warmup_epochs", "1",
                   "--lr", str(cfg.lp_lr), "--min_crop_scale", str(cfg.min_crop_scale),
                   "--eval_freq", str(cfg.lp_epochs), "--save_freq", "0", "--seed", "0", "--no_auto_resume",
                   *common(cfg, out)]
            run_timed(cmd, out, cfg.threads)
        return {"top1": last_top1(out)}
    return run


def run_pool(jobs: dict, workers: int) -> dict:
    results, errors = {}, []
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fn): key for key, fn in jobs.items()}
        for fut in cf.as_completed(futures):
            key = futures[fut]
            try:
                results[key] = fut.result()
                print(f"[{time.strftime('%H:%M:%S')}] done {key}: "
                      f"{ {k: v for k, v in results[key].items() if k != 'command'} }", flush=True)
            except Exception as e:  # keep the other runs going; report at the end
                errors.append(f"{key}: {e}")
                print(f"[{time.strftime('%H:%M:%S')}] FAILED {key}: {e}", flush=True)
    if errors:
        raise RuntimeError("some runs failed:\n" + "\n".join(errors))
    return results


def mean_std(xs: list[float]) -> dict:
    return {"runs": xs, "mean": round(statistics.mean(xs), 2), "std": round(statistics.stdev(xs), 2) if len(xs) > 1 else 0.0}


def run_experiment(cfg: Config, arms: list[Arm], merge: bool = False) -> dict:
    t0 = time.time()
    write_split(cfg.out / "data", **cfg.data_kwargs)
    main = f"l{cfg.main_budget}"
    # Phase 1: pretraining (most expensive first), with the scratch evaluations filling the pool.
    jobs: dict = {}
    for arm in sorted([a for a in arms if a.pretrain_model], key=lambda a: a.name.startswith("ummae")):
        jobs[("pretrain", arm.name)] = pretrain_job(cfg, arm)

    def eval_jobs(arm: Arm) -> dict:
        seeds = cfg.seeds if arm.headline else cfg.seeds[:1]
        j = {(arm.name, "knn", main): knn_job(cfg, arm, main), (arm.name, "linprobe", main): linprobe_job(cfg, arm, main)}
        for s in seeds:
            j[(arm.name, "finetune", main, s)] = finetune_job(cfg, arm, cfg.main_budget, s)
        if arm.name in ("scratch_swin", "scratch_pvt", "ummae_swin", "ummae_pvt"):
            for b in cfg.budgets:
                if b != cfg.main_budget:
                    j[(arm.name, "finetune", f"l{b}", cfg.seeds[0])] = finetune_job(cfg, arm, b, cfg.seeds[0])
        return j
    for arm in arms:
        if arm.pretrain_model is None:
            jobs.update(eval_jobs(arm))
    done = run_pool(jobs, cfg.jobs)
    jobs = {}
    for arm in arms:
        if arm.pretrain_model is not None:
            jobs.update(eval_jobs(arm))
    done.update(run_pool(jobs, cfg.jobs))

    table: dict = {}
    for arm in arms:
        row: dict = {"classifier": arm.classifier, "pretrain_model": arm.pretrain_model, "headline": arm.headline}
        if arm.pretrain_model:
            t = done[("pretrain", arm.name)]
            row["pretrain_wall_s"], row["pretrain_cpu_s"] = t["wall_s"], t["cpu_s"]
            log = cfg.out / "pretrain" / arm.name / "log.txt"
            row["pretrain_loss"] = [round(json.loads(l)["train_loss"], 4) for l in log.read_text().splitlines() if l.strip()]
        row["knn"] = done[(arm.name, "knn", main)]["top1"]
        row["linprobe"] = done[(arm.name, "linprobe", main)]["top1"]
        ft = {}
        for key, res in done.items():
            if key[0] == arm.name and key[1] == "finetune":
                ft.setdefault(key[2], []).append(res["top1"])
        row["finetune"] = {b: mean_std(v) for b, v in sorted(ft.items())}
        table[arm.name] = row
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    wall = round(time.time() - t0, 1)
    command = " ".join([Path(sys.executable).name] + sys.argv)
    result = {"arms": table, "setup": setup, "total_wall_s": wall, "hardware": hardware(), "command": command}
    path = cfg.out / "results.json"
    if merge and path.exists():
        result = merge_results(json.loads(path.read_text()), result)
    path.write_text(json.dumps(result, indent=2))
    return result


def merge_results(prior: dict, new: dict) -> dict:
    """Add ``new``'s arms to an earlier table made with the same recipe; its other rows are kept as
    they were and the invocation is recorded. A different recipe is refused (rows would not compare)."""
    new = json.loads(json.dumps(new))                  # tuples as lists, as the earlier table was read back
    differ = {k: (prior["setup"].get(k), v) for k, v in new["setup"].items()
              if k not in ("out", "jobs", "tag") and prior["setup"].get(k) != v}
    if differ:
        raise SystemExit(f"--merge: the recipe differs from the earlier table's (earlier, now): {differ}")
    merged = json.loads(json.dumps(prior))
    merged["arms"].update(new["arms"])
    merged.setdefault("invocations", []).append({"command": new["command"], "arms": list(new["arms"]),
                                                 "wall_s": new["total_wall_s"], "hardware": new["hardware"]})
    merged["total_wall_s"] = round(prior["total_wall_s"] + new["total_wall_s"], 1)
    return merged


def run_dev(cfg: Config, arms: list[Arm]) -> dict:
    """Recipe checks: finetune on dev/train (50 labels/class), top-1 on dev/val (150/class carved
    out of the labelled pretraining images). The test split is not read."""
    write_split(cfg.out / "data", **cfg.data_kwargs)
    jobs: dict = {("pretrain", a.name): pretrain_job(cfg, a) for a in arms if a.pretrain_model}
    run_pool(jobs, cfg.jobs)
    jobs = {}
    for arm in arms:
        jobs[(arm.name, "knn")] = knn_job(cfg, arm, "dev")
        for s in cfg.seeds:
            jobs[(arm.name, "finetune", s)] = finetune_job(cfg, arm, cfg.main_budget, s, data="dev")
    done = run_pool(jobs, cfg.jobs)
    recipe = {k: getattr(cfg, k) for k in ("ft_steps", "ft_batch", "blr", "scratch_blr", "layer_decay", "drop_path",
                                           "min_crop_scale", "pretrain_blr")}
    rows = {}
    for arm in arms:
        ft = [done[(arm.name, "finetune", s)]["top1"] for s in cfg.seeds]
        rows[arm.name] = {"knn_dev": done[(arm.name, "knn")]["top1"], "finetune_dev": mean_std(ft)}
        print(f"dev {cfg.tag or 'default':<12} {arm.name:<13} k-NN {rows[arm.name]['knn_dev']:6.2f}  "
              f"finetune {rows[arm.name]['finetune_dev']['mean']:6.2f} +- {rows[arm.name]['finetune_dev']['std']:.2f}  {recipe}")
    record = {"tag": cfg.tag, "recipe": recipe, "pretrain_epochs": cfg.pretrain_epochs, "arms": rows}
    with open(cfg.out / "dev_results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def write_monitor_split(data: Path, dest: Path, seed: int) -> dict:
    """The fixed train/val split the pretraining monitor makes of the class folders ``data``
    (engine/monitor.split_monitor_set, same seed), written as ImageNet-layout ``dest/{train,val}`` of
    hard links (copies where the file system refuses links), so that ``main_finetune.py --knn`` reads
    exactly the monitor's images. Returns the sizes."""
    from engine.monitor import split_monitor_set
    train, val = split_monitor_set(str(data), seed)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, images in (("train", train), ("val", val)):
        for path, label in images.samples:
            target = tmp / split / images.classes[label] / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = os.path.realpath(path)   # a link to a relative symlink would dangle in another folder
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return {"train": len(train), "val": len(val)}


class LoadSampler:
    """The 1-minute load average every ``every`` seconds while a block runs (the machine may be shared)."""

    def __init__(self, every: float = 15.0) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append(round(os.getloadavg()[0], 2))
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"every_s": self.every, "mean": round(statistics.mean(self.samples), 2),
                "max": max(self.samples), "samples": self.samples}


def monitor_points(epochs: int, freq: int) -> int:
    """How many monitor points a run of ``epochs`` has at ``--monitor_freq freq`` (the last epoch always has one)."""
    return len({e for e in range(epochs) if (e + 1) % freq == 0} | {epochs - 1})


def run_monitor(cfg: Config, arms: list[Arm], freq: int) -> dict:
    """Each pretrained arm's pretraining as in the table, plus the feature monitor on the labelled
    training images of the main budget (l50/train: the monitor splits them into its own train/val; the
    test split is never read) every ``freq`` epochs. Then the offline k-NN (``main_finetune.py --knn``)
    of the final checkpoint on the same split, the monitor's share of the run's wall and CPU time, and
    a figure of the monitor's accuracies beside the loss. The same pretraining without monitors (the
    table's run, pretrain/<arm>) runs beside it as the control: the difference in wall and CPU time
    cross-checks the monitor's own timing, and its final weights must be the monitored run's (the
    monitor draws no training random number). Writes OUT/monitor.json and monitor_<arm>.png."""
    from main_pretrain import MONITOR_FREQ
    write_split(cfg.out / "data", **cfg.data_kwargs)
    data = cfg.out / "data" / f"l{cfg.main_budget}" / "train"
    split_name = f"monitor_l{cfg.main_budget}"
    sizes = write_monitor_split(data, cfg.out / "data" / split_name, seed=0)
    result = {"monitor_data": str(data), "monitor_freq": freq, "split": {"folder": str(cfg.out / "data" / split_name),
                                                                          "seed": 0, **sizes}, "arms": {}}
    pretrained = [a for a in arms if a.pretrain_model]
    jobs = {}
    for arm in pretrained:
        jobs[("monitored", arm.name)] = pretrain_job(cfg, arm, f"{arm.name}_monitor{freq}",
                                                     ("--monitor_data", str(data), "--monitor_freq", str(freq)))
        jobs[("control", arm.name)] = pretrain_job(cfg, arm)
    fresh = [key for key in jobs if not (cfg.out / "pretrain" / run_name(key, freq) / "time.json").is_file()]
    with LoadSampler() as load:
        done = run_pool(jobs, cfg.jobs)
    for key in fresh:
        (cfg.out / "pretrain" / run_name(key, freq) / "load.json").write_text(json.dumps(load.summary()))
    for arm in pretrained:
        name = f"{arm.name}_monitor{freq}"
        out = cfg.out / "pretrain" / name
        times, control = done[("monitored", arm.name)], done[("control", arm.name)]
        knn_out = cfg.out / "eval" / name / f"knn_{split_name}"
        offline = knn_job(cfg, arm, split_name, name)()["top1"]
        lines = [json.loads(l) for l in (out / "log.txt").read_text().splitlines() if l.strip()]
        epochs = [{"epoch": r["epoch"], "train_loss": round(r["train_loss"], 4),
                   **{k.removeprefix("monitor_"): r[k] for k in ("monitor_knn_acc1", "monitor_probe_acc1",
                                                                   "monitor_seconds", "monitor_cpu_seconds") if k in r}}
                  for r in lines]
        points = [e for e in epochs if "knn_acc1" in e]
        mon_s = sum(e["seconds"] for e in points)
        mon_cpu = sum(e.get("cpu_seconds", 0.0) for e in points)
        per_point = mon_s / len(points)
        n_default = monitor_points(cfg.pretrain_epochs, MONITOR_FREQ)
        train_s = times["wall_s"] - mon_s
        result["arms"][arm.name] = {
            "run": name, "pretrain_command": times["command"],
            "knn_command": json.loads((knn_out / "time.json").read_text())["command"] if (knn_out / "time.json").is_file() else None,
            "pretrain_wall_s": times["wall_s"], "pretrain_cpu_s": times["cpu_s"],
            "load_avg": json.loads((out / "load.json").read_text()) if (out / "load.json").is_file() else None,
            "control": {"run": arm.name, "wall_s": control["wall_s"], "cpu_s": control["cpu_s"],
                        "command": control["command"],
                        "same_final_weights": final_digest(out) == final_digest(cfg.out / "pretrain" / arm.name)},
            "epochs": epochs, "monitor_points": len(points),
            "final_monitor_knn": points[-1]["knn_acc1"], "final_monitor_probe": points[-1]["probe_acc1"],
            "offline_knn_same_split": offline, "knn_difference": round(points[-1]["knn_acc1"] - offline, 3),
            "monitor_s": round(mon_s, 2), "monitor_cpu_s": round(mon_cpu, 2),
            "monitor_wall_share": round(mon_s / times["wall_s"], 4),
            "monitor_cpu_share": round(mon_cpu / times["cpu_s"], 4),
            f"projected_wall_share_at_default_freq_{MONITOR_FREQ}": round(
                n_default * per_point / (train_s + n_default * per_point), 4),
        }
        plot_monitor(result["arms"][arm.name], f"{arm.name}: monitor every {freq} epoch(s) on a fixed split of "
                     f"l{cfg.main_budget}/train ({sizes['train']} bank / {sizes['val']} query images)",
                     cfg.out / f"monitor_{arm.name}.png")
    result["hardware"] = hardware()
    result["command"] = " ".join([Path(sys.executable).name] + sys.argv)
    (cfg.out / "monitor.json").write_text(json.dumps(result, indent=2))
    return result


def run_name(key: tuple[str, str], freq: int) -> str:
    """The pretraining folder of a monitor-phase job: ("monitored" | "control", arm)."""
    return f"{key[1]}_monitor{freq}" if key[0] == "monitored" else key[1]


def final_digest(run_dir: Path) -> str | None:
    """The final weights digest a pretraining run prints (rank 0), or None."""
    lines = [l for l in (run_dir / "stdout.txt").read_text().splitlines() if "final weights digest" in l]
    return lines[-1].split()[-1] if lines else None


def plot_monitor(row: dict, title: str, path: Path) -> None:
    """Pretraining loss per epoch (left) beside the monitor's k-NN and linear-probe top-1 (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = row["epochs"]
    points = [e for e in epochs if "knn_acc1" in e]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot([e["epoch"] + 1 for e in epochs], [e["train_loss"] for e in epochs], "k-o", ms=3)
    left.set_xlabel("epoch")
    left.set_ylabel("pretraining loss")
    left.grid(alpha=0.3)
    x = [e["epoch"] + 1 for e in points]
    right.plot(x, [e["knn_acc1"] for e in points], "C0-o", ms=3, label="k-NN (k=20)")
    right.plot(x, [e["probe_acc1"] for e in points], "C1-s", ms=3, label="ridge probe")
    right.plot([x[-1]], [row["offline_knn_same_split"]], "C3x", ms=9, label="offline k-NN, final checkpoint")
    right.set_xlabel("epoch")
    right.set_ylabel("monitor top-1 (%)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hardware() -> dict:
    import platform
    import torch
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "load_avg_at_end": [round(x, 1) for x in os.getloadavg()]}


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = result["arms"]
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, style in (("scratch_swin", "k--o"), ("ummae_swin", "C0-o"), ("scratch_pvt", "k:s"), ("ummae_pvt", "C1-s")):
        if name in arms:
            pts = sorted((int(b[1:]), v["mean"]) for b, v in arms[name]["finetune"].items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("labels per class")
    ax.set_ylabel("finetuned top-1, test (%)")
    ax.set_title("equal budget: 240 steps at every label count", fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "top1_vs_labels.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    main = f"l{result['setup']['main_budget']}"
    pretrained = [(n, r) for n, r in arms.items() if "pretrain_wall_s" in r and main in r["finetune"]]
    markers = "osD^vP*Xph"
    for i, (name, row) in enumerate(pretrained):  # one colour and marker per arm (at most 10 arms)
        ax.errorbar(row["pretrain_wall_s"], row["finetune"][main]["mean"], yerr=row["finetune"][main]["std"],
                    fmt=markers[i % len(markers)], color=f"C{i % 10}", label=name, capsize=3)
    for name, ls in (("scratch_swin", "--"), ("scratch_pvt", ":")):
        if name in arms and main in arms[name]["finetune"]:
            ax.axhline(arms[name]["finetune"][main]["mean"], color="k", ls=ls, lw=1, label=f"{name} (no pretraining)")
    ax.set_xlabel("pretraining wall time (s; 1 thread, 2 programs on 2 cores)")
    ax.set_ylabel(f"finetuned top-1, {main[1:]} labels/class (%)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "top1_vs_pretrain_time.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def print_table(result: dict) -> None:
    main = f"l{result['setup']['main_budget']}"
    print(f"{'arm':<13} {'pre wall s':>10} {'pre cpu s':>9} {'k-NN':>6} {'lin':>6} {'finetune ' + main:>18}  other budgets")
    for name, r in result["arms"].items():
        ft = r["finetune"].get(main)
        others = ", ".join(f"{b}: {v['mean']:.1f}" for b, v in r["finetune"].items() if b != main)
        print(f"{name:<13} {r.get('pretrain_wall_s', '-'):>10} {r.get('pretrain_cpu_s', '-'):>9} {r['knn']:>6.2f} "
              f"{r['linprobe']:>6.2f} {ft['mean']:>9.2f} +- {ft['std']:<5.2f}  {others}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="work_dirs/experiment")
    p.add_argument("--smoke", action="store_true", help="a miniature of every step (pipeline check, not accuracy)")
    p.add_argument("--arms", nargs="+", default=None, choices=[a.name for a in ARMS])
    p.add_argument("--pretrain_epochs", type=int, default=None)
    p.add_argument("--ft_steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--plot_only", action="store_true", help="redraw the figures and the table from results.json")
    p.add_argument("--merge", action="store_true",
                   help="add the arms run now to OUT/results.json (same recipe), keeping its other rows")
    p.add_argument("--jobs", type=int, default=None, help="programs run side by side (default 2)")
    p.add_argument("--phase", choices=["main", "dev", "monitor"], default="main",
                   help="main: the table on the test split; dev: a recipe check on dev/ (never the test split); "
                        "monitor: the pretraining with feature monitors on l50/train, checked against the offline "
                        "k-NN of its final checkpoint (never the test split)")
    p.add_argument("--monitor_freq", type=int, default=1, help="monitor phase: epochs between monitor points")
    p.add_argument("--tag", default=None, help="dev phase: name of the recipe variant (its run folders)")
    for k in ("blr", "scratch_blr", "layer_decay", "drop_path", "min_crop_scale", "pretrain_blr"):
        p.add_argument(f"--{k}", type=float, default=None, help=f"finetuning {k} (default: Config)")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    cfg = smoke_config(out) if a.smoke else Config(out=out)
    for k in ("pretrain_epochs", "ft_steps", "jobs", "tag", "blr", "scratch_blr", "layer_decay", "drop_path",
              "min_crop_scale", "pretrain_blr"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    if a.seeds:
        cfg.seeds = tuple(a.seeds)
    arms = [x for x in ARMS if a.arms is None or x.name in a.arms]
    if a.plot_only:
        result = json.loads((out / "results.json").read_text())
        plot(result, out)
        print_table(result)
        return 0
    if a.phase == "dev":
        run_dev(cfg, arms)
        return 0
    if a.phase == "monitor":
        result = run_monitor(cfg, [x for x in arms if a.arms is not None or x.name == "ummae_swin"], a.monitor_freq)
        for name, row in result["arms"].items():
            print(f"{name}: monitor k-NN {row['final_monitor_knn']:.2f} vs offline {row['offline_knn_same_split']:.2f} "
                  f"on the same split; monitors {row['monitor_s']:.1f} s of {row['pretrain_wall_s']:.0f} s wall "
                  f"({100 * row['monitor_wall_share']:.2f}%), {row['monitor_cpu_s']:.1f} of {row['pretrain_cpu_s']:.0f} "
                  f"CPU-s ({100 * row['monitor_cpu_share']:.2f}%); without monitors {row['control']['wall_s']:.0f} s "
                  f"wall, {row['control']['cpu_s']:.0f} CPU-s, same final weights: {row['control']['same_final_weights']}")
        print(f"results in {out / 'monitor.json'}")
        return 0
    result = run_experiment(cfg, arms, merge=a.merge)
    plot(result, out)
    print_table(result)
    print(f"total wall time {result['total_wall_s']:.0f} s; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
