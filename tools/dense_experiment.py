"""Does pretraining pay off in detection and segmentation? A small replica of the paper's dense transfer.

Real silhouettes composed into scenes (tools/make_dense_scenes.py: animal-mnist animals pasted on
textured backgrounds, 64-128 px, exact boxes, masks and label maps), real programs run as
subprocesses, as in the classification experiment (tools/experiment.py, FINETUNE.md):

  1. pretrain each encoder once on the 2,000 unlabelled train scenes (main_pretrain.py, 128 px):
     UM-MAE and SimMIM, Swin and PVT (the pico models with 4-px patches);
  2. for every backbone, starting point (``scratch``: random initialisation) and seed, GFL
     detection (main_detection.py) and UperNet segmentation (main_segmentation.py) trained on the
     train scenes for the same number of optimizer steps; box AP and mIoU on the test scenes at the
     END of training (the run record's last evaluation, never the best one), mean +- std over seeds;
     results.json and a figure.

Every program records its wall time and process CPU time (user + system, from wait4: the fair cost
on a shared machine). A finished run (same command, run record ``completed``) is reused, so an
interrupted table continues where it stopped; an unfinished one is started again in a clean folder.

    python tools/dense_experiment.py --out work_dirs/dense                       # the table (DETECTION.md)
    python tools/dense_experiment.py --out work_dirs/dense --phase dev --seeds 0 \
        --backbones pvt --inits scratch ummae --tag lr3e-3 --det_lr 3e-3           # a recipe check on dev
    python tools/dense_experiment.py --out /tmp/dense_smoke --smoke              # pipeline check, ~1 min

``--phase dev`` trains on the same train scenes and evaluates on the dev scenes (silhouettes never
pretrained on, never in a train or test scene); every recipe choice was made that way, never on
the test scenes. Each dev invocation appends a record to dev_results.jsonl.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import fcntl
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.experiment import hardware, mean_std, run_timed  # noqa: E402
from tools.make_dense_scenes import SceneSpec, write_scenes  # noqa: E402

BACKBONES = {"swin": "swin_pico_128", "pvt": "pvt_pico_128"}
# pretraining method -> (model of a backbone, main_pretrain.py flags); the flags are the
# classification experiment's (tools/experiment.py)
PRETRAIN = {
    "ummae": ({"swin": "mae_swin_pico_128", "pvt": "mae_pvt_pico_128"},
              ("--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss")),
    "simmim": ({"swin": "simmim_swin_pico_128", "pvt": "simmim_pvt_pico_128"}, ("--mask_ratio", "0.75")),
}
INITS = ("scratch", *PRETRAIN)
TASKS = ("det", "seg")
NUM_CLASSES = 10


@dataclass
class Recipe:
    """One dense task's finetuning recipe (the same for every backbone and starting point, except the
    learning rate and layer decay, which scratch runs take from their own fields)."""
    steps: int
    lr: float
    scratch_lr: float
    layer_decay: float = 1.0
    batch: int = 8
    warmup_frac: float = 0.1
    input_size: int = 128         # the scenes' long side is resized to this (x the training ratio)
    ratio_range: tuple[float, float] = (0.75, 1.25)
    width: int = 64               # detection: adapters and FPN; segmentation: adapters and UperNet
    aux_width: int = 32           # segmentation: the FCN head
    drop_path: float = 0.1


@dataclass
class Config:
    out: Path
    scenes: SceneSpec = field(default_factory=SceneSpec)
    pretrain_epochs: int = 20
    pretrain_batch: int = 128
    pretrain_blr: float = 6e-3
    pretrain_warmup: int = 2
    # chosen on the dev scenes (DETECTION.md, "How the recipe was set"): 1000 steps; pretrained
    # backbones with layer decay 0.85, as in the classification experiment
    det: Recipe = field(default_factory=lambda: Recipe(steps=1000, lr=2e-3, scratch_lr=2e-3, layer_decay=0.85))
    seg: Recipe = field(default_factory=lambda: Recipe(steps=1000, lr=2e-3, scratch_lr=6e-3, layer_decay=0.85))
    seeds: tuple[int, ...] = (0, 1, 2)
    backbones: tuple[str, ...] = ("swin", "pvt")
    inits: tuple[str, ...] = INITS
    jobs: int = 2
    threads: int = 1
    tag: str = ""


def smoke_config(out: Path) -> Config:
    tiny = dict(steps=2, batch=4, input_size=64, width=32, aux_width=16)
    return Config(out=out, scenes=SceneSpec(n_train=8, n_dev=4, n_test=4, min_size=48, max_size=64, min_object=16,
                                            max_object=32, max_objects=2, per_class=2),
                  pretrain_epochs=1, pretrain_batch=8, pretrain_warmup=0, seeds=(0,),
                  det=Recipe(lr=1e-3, scratch_lr=1e-3, **tiny), seg=Recipe(lr=1e-3, scratch_lr=1e-3, **tiny))


# ---------------------------------------------------------------------------------------- jobs

@dataclass
class Job:
    key: tuple
    run: Callable[[], dict]
    deps: tuple = ()
    cost: float = 1.0             # rough CPU cost, to start long jobs first
    rank: int = -1                # started in order of rank (the seed: a table fills seed by seed), then cost
    command: tuple = ()           # the program run (for the record and the tests)
    out: Path | None = None       # its output folder


def _common(out: Path) -> list[str]:
    return ["--device", "cpu", "--num_workers", "0", "--log_dir=", "--print_freq", "50", "--output_dir", str(out)]


def finished_record(out: Path) -> dict:
    """The ``finished`` entry of the newest run record (run-NNN.json) in ``out``; a run that did not
    complete (stopped by a signal, crashed, still running) is an error naming the record."""
    records = sorted(out.glob("run-[0-9]*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not records:
        raise RuntimeError(f"{out}: no run record (run-NNN.json): the program did not start")
    fin = json.loads(records[-1].read_text()).get("finished")
    status = fin.get("status") if fin else "not finished"
    if status != "completed":
        raise RuntimeError(f"{records[-1]}: the run ended with status {status!r}, not 'completed'")
    return fin


def _completed_run(out: Path) -> bool:
    """Whether ``out`` holds a run that finished (its newest run record says completed)."""
    try:
        finished_record(out)
    except (OSError, ValueError, RuntimeError):
        return False
    return True


def _completed(out: Path, cmd: list[str]) -> dict | None:
    """The time.json of a finished run of exactly ``cmd`` in ``out``, else None."""
    try:
        t = json.loads((out / "time.json").read_text())
    except (OSError, ValueError):
        return None
    return t if _completed_run(out) and t.get("command") == " ".join(cmd) else None


def _reuse_or_run(out: Path, cmd: list[str], threads: int) -> dict:
    """Reuse a completed run of ``cmd``; otherwise run it in a clean ``out`` (no stale checkpoint,
    log line or record of an earlier attempt) and check that it completed (a program stopped by a
    signal exits 0 after its checkpoint). Two invocations that need the same run (a pretraining
    shared by a dev check and the table) take turns on a lock beside ``out``, so the second one
    reuses the first one's run instead of wiping it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)    # released when the file closes or this process dies
        t = _completed(out, cmd)
        if t is not None:
            return t
        shutil.rmtree(out, ignore_errors=True)
        t = run_timed(cmd, out, threads)
        finished_record(out)
        return t


def pretrain_dir(cfg: Config, backbone: str, method: str) -> Path:
    return cfg.out / "pretrain" / f"{method}_{backbone}"


def pretrain_job(cfg: Config, backbone: str, method: str) -> Job:
    models, flags = PRETRAIN[method]
    out = pretrain_dir(cfg, backbone, method)
    cmd = [sys.executable, "main_pretrain.py", "--model", models[backbone], *flags,
           "--data_path", str(cfg.out / "data" / "pretrain_scenes"), "--batch_size", str(cfg.pretrain_batch),
           "--epochs", str(cfg.pretrain_epochs), "--warmup_epochs", str(cfg.pretrain_warmup),
           "--blr", str(cfg.pretrain_blr), "--weight_decay", "0.05", "--vis_freq", "0", "--save_freq", "0",
           "--seed", "0", *_common(out)]
    # SimMIM encodes every token, UM-MAE a quarter: about 2.3x the CPU time (Swin, 128 px)
    return Job(("pretrain", backbone, method), lambda: _reuse_or_run(out, cmd, cfg.threads),
               cost=(6.0 if method == "simmim" else 3.0) * (2.0 if backbone == "swin" else 1.0),
               command=tuple(cmd), out=out)


def start_weights(cfg: Config, backbone: str, init: str) -> tuple[list[str], tuple]:
    """(--finetune flags, the jobs they need) of a starting point."""
    if init == "scratch":
        return [], ()
    return (["--finetune", str(pretrain_dir(cfg, backbone, init) / "checkpoint-last.pth")],
            (("pretrain", backbone, init),))


def dense_dir(cfg: Config, phase: str, task: str, backbone: str, init: str, seed: int) -> Path:
    tag = f"_{cfg.tag}" if cfg.tag else ""
    return cfg.out / phase / task / f"{init}_{backbone}{tag}_seed{seed}"


def det_job(cfg: Config, phase: str, backbone: str, init: str, seed: int) -> Job:
    r, out = cfg.det, dense_dir(cfg, phase, "det", backbone, init, seed)
    n_train = cfg.scenes.n_train                   # every scene has at least one animal
    steps_per_epoch = max(1, n_train // r.batch)
    epochs = max(1, math.ceil(r.steps / steps_per_epoch))
    weights, deps = start_weights(cfg, backbone, init)
    pretrained = init != "scratch"
    cmd = [sys.executable, "main_detection.py", "--detector", "gfl", "--model", BACKBONES[backbone], *weights,
           "--data_path", str(cfg.out / "data" / f"coco_{phase}"), "--batch_size", str(r.batch),
           "--epochs", str(epochs), "--input_size", str(r.input_size), "--ratio_range", *map(str, r.ratio_range),
           "--test_size", str(r.input_size), str(r.input_size),
           "--lr", str(r.lr if pretrained else r.scratch_lr),
           "--layer_decay", str(r.layer_decay if pretrained else 1.0),
           "--warmup_iters", str(max(1, round(r.warmup_frac * epochs * steps_per_epoch))),
           "--adapter_dim", str(r.width), "--fpn_dim", str(r.width), "--drop_path", str(r.drop_path),
           "--eval_freq", str(epochs), "--save_freq", str(epochs), "--seed", str(seed), "--no_auto_resume",
           *_common(out)]

    def run() -> dict:
        t = _reuse_or_run(out, cmd, cfg.threads)
        box = finished_record(out)["final_val"]["bbox"]   # the evaluation after the last epoch
        return {"AP": 100 * box["AP"], "AP50": 100 * box["AP50"], "AP75": 100 * box["AP75"],
                "steps": epochs * steps_per_epoch, "time": t}
    return Job(("det", phase, backbone, init, seed), run, deps, cost=2.0 if backbone == "swin" else 1.5,
               rank=seed, command=tuple(cmd), out=out)


def seg_job(cfg: Config, phase: str, backbone: str, init: str, seed: int) -> Job:
    r, out = cfg.seg, dense_dir(cfg, phase, "seg", backbone, init, seed)
    weights, deps = start_weights(cfg, backbone, init)
    pretrained = init != "scratch"
    cmd = [sys.executable, "main_segmentation.py", "--model", BACKBONES[backbone], *weights,
           "--data_path", str(cfg.out / "data" / f"ade_{phase}"), "--batch_size", str(r.batch),
           "--iters", str(r.steps), "--eval_interval", str(r.steps), "--input_size", str(r.input_size),
           "--img_scale", str(r.input_size), str(r.input_size), "--ratio_range", *map(str, r.ratio_range),
           "--no_reduce_zero_label", "--nb_classes", str(NUM_CLASSES + 1), "--test_mode", "whole",
           "--test_stride", str(r.input_size), "--lr", str(r.lr if pretrained else r.scratch_lr),
           "--layer_decay", str(r.layer_decay if pretrained else 1.0),
           "--warmup_iters", str(max(1, round(r.warmup_frac * r.steps))), "--channels", str(r.width),
           "--aux_channels", str(r.aux_width), "--drop_path", str(r.drop_path), "--seed", str(seed),
           "--no_auto_resume", *_common(out)]

    def run() -> dict:
        t = _reuse_or_run(out, cmd, cfg.threads)
        whole = finished_record(out)["final_val"]["whole"]  # the evaluation after the last iteration
        return {"mIoU": 100 * whole["mIoU"], "aAcc": 100 * whole["aAcc"], "steps": r.steps, "time": t}
    return Job(("seg", phase, backbone, init, seed), run, deps, cost=2.0 if backbone == "swin" else 1.5,
               rank=seed, command=tuple(cmd), out=out)


def run_jobs(jobs: list[Job], workers: int) -> dict:
    """Run ``jobs`` on ``workers`` threads (each job one program), a job once all its deps are done,
    the costliest ready job first. A failed job fails its dependants; the rest go on; errors are
    raised at the end."""
    results: dict = {}
    failed: dict = {}
    pending = {j.key: j for j in jobs}
    running: dict = {}
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            for key, job in list(pending.items()):
                if any(d in failed for d in job.deps):
                    failed[key] = f"needs {[d for d in job.deps if d in failed]}"
                    del pending[key]
            ready = sorted((j for j in pending.values() if all(d in results for d in j.deps)),
                           key=lambda j: (j.rank, -j.cost))
            for job in ready[:max(0, workers - len(running))]:
                running[pool.submit(job.run)] = job.key
                del pending[job.key]
            if not running:
                if pending:  # a dependency that is not among the jobs
                    raise RuntimeError(f"jobs wait on missing dependencies: {sorted(pending)}")
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                key = running.pop(fut)
                try:
                    results[key] = fut.result()
                    shown = {k: v for k, v in results[key].items() if k not in ("time", "command")}
                    print(f"[{time.strftime('%H:%M:%S')}] done {key}: {shown} "
                          f"({results[key].get('time', results[key]).get('wall_s')} s)", flush=True)
                except Exception as e:  # keep the other runs going; report at the end
                    failed[key] = str(e)
                    print(f"[{time.strftime('%H:%M:%S')}] FAILED {key}: {e}", flush=True)
    if failed:
        raise RuntimeError("some runs failed:\n" + "\n".join(f"{k}: {v}" for k, v in failed.items()))
    return results


def plan(cfg: Config, phase: str) -> list[Job]:
    jobs: dict = {}
    for b in cfg.backbones:
        for init in cfg.inits:
            if init != "scratch":
                j = pretrain_job(cfg, b, init)
                jobs[j.key] = j
            for s in cfg.seeds:
                for j in (det_job(cfg, phase, b, init, s), seg_job(cfg, phase, b, init, s)):
                    jobs[j.key] = j
    return list(jobs.values())


# ---------------------------------------------------------------------------------------- the table

def prepare_data(cfg: Config) -> Path:
    return write_scenes(cfg.out / "data", cfg.scenes)


def arm_rows(cfg: Config, done: dict, phase: str) -> dict:
    rows: dict = {}
    for (kind, *rest), res in done.items():
        if kind not in TASKS:
            continue
        _, b, init, seed = rest
        row = rows.setdefault(f"{init}_{b}", {"backbone": b, "init": init, "det": {}, "seg": {}})
        row[kind][seed] = res
    for name, row in rows.items():
        for task, metric in (("det", "AP"), ("seg", "mIoU")):
            runs = [row[task][s] for s in sorted(row[task])]
            stats = mean_std([round(r[metric], 2) for r in runs]) if runs else {"runs": [], "mean": None, "std": None}
            row[task] = {**stats, "steps": runs[0]["steps"] if runs else None, "seeds": sorted(row[task]),
                         "wall_s": [r["time"]["wall_s"] for r in runs], "cpu_s": [r["time"]["cpu_s"] for r in runs]}
            if task == "det" and runs:
                row[task]["AP50"] = mean_std([round(r["AP50"], 2) for r in runs])["mean"]
                row[task]["AP75"] = mean_std([round(r["AP75"], 2) for r in runs])["mean"]
        if row["init"] != "scratch":
            t = done[("pretrain", row["backbone"], row["init"])]
            row["pretrain"] = {"model": PRETRAIN[row["init"]][0][row["backbone"]], "wall_s": t["wall_s"],
                               "cpu_s": t["cpu_s"]}
    return rows


def setup_of(cfg: Config) -> dict:
    d = asdict(cfg)
    d["out"] = str(cfg.out)
    return json.loads(json.dumps(d))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def collect(jobs: list[Job]) -> tuple[dict, list]:
    """The finished runs among ``jobs`` (nothing is started) and the keys of the others."""
    done, missing = {}, []
    for j in jobs:
        if j.out is not None and _completed(j.out, list(j.command)) is not None:
            done[j.key] = j.run()
        else:
            missing.append(j.key)
    return done, missing


def run_table(cfg: Config, phase: str = "test", partial: bool = False) -> dict:
    """``phase`` "test": the table (evaluated on the test scenes); "dev": a recipe check (dev scenes).
    ``partial``: start nothing, tabulate the runs finished so far (results.json says which are missing)."""
    t0 = time.time()
    prepare_data(cfg)
    jobs = plan(cfg, phase)
    done, missing = collect(jobs) if partial else (run_jobs(jobs, cfg.jobs), [])
    rows = arm_rows(cfg, done, phase)
    times = [r.get("time", r) for r in done.values()]
    result = {"phase": phase, "partial": bool(missing), "missing": [list(k) for k in missing],
              "arms": rows, "gains": gains(rows), "setup": setup_of(cfg),
              "invocation_wall_s": round(time.time() - t0, 1),
              "program_wall_s_sum": round(sum(t["wall_s"] for t in times), 1),
              "program_cpu_s_sum": round(sum(t["cpu_s"] for t in times), 1), "hardware": hardware(), "commit": git_commit(),
              "command": " ".join([Path(sys.executable).name] + sys.argv),
              "scenes": json.loads((cfg.out / "data" / "scenes.json").read_text())["stats"]}
    if phase == "dev":
        with open(cfg.out / "dev_results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
    else:
        (cfg.out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def gains(rows: dict) -> dict:
    """Per backbone: each pretrained arm minus scratch (points), and UM-MAE vs SimMIM (points and the
    ratio of pretraining wall / CPU time) - the quantities the targets are stated in."""
    out: dict = {}
    for b in BACKBONES:
        base = rows.get(f"scratch_{b}")
        g: dict = {}
        for init in PRETRAIN:
            r = rows.get(f"{init}_{b}")
            if r and base:
                g[f"{init}_vs_scratch"] = {t: _diff(r[t]["mean"], base[t]["mean"]) for t in TASKS}
        um, sm = rows.get(f"ummae_{b}"), rows.get(f"simmim_{b}")
        if um and sm:
            g["ummae_vs_simmim"] = {t: _diff(um[t]["mean"], sm[t]["mean"]) for t in TASKS}
            g["pretrain_time_ratio"] = {k: round(um["pretrain"][k] / sm["pretrain"][k], 3) for k in ("wall_s", "cpu_s")}
        if g:
            out[b] = g
    return out


def plot(result: dict, out: Path) -> Path:
    """Box AP and mIoU (mean +- std over seeds) against pretraining CPU time; scratch at 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    markers = {"scratch": "o", "ummae": "s", "simmim": "D"}
    for ax, (task, label) in zip(axes, (("det", "GFL box AP, test scenes"), ("seg", "UperNet mIoU, test scenes"))):
        for i, b in enumerate(BACKBONES):
            pts = []
            for init, mk in markers.items():
                r = result["arms"].get(f"{init}_{b}")
                if not r or r[task]["mean"] is None:
                    continue
                x = r["pretrain"]["cpu_s"] if "pretrain" in r else 0.0
                n = len(r[task]["runs"])
                ax.errorbar(x, r[task]["mean"], yerr=r[task]["std"], fmt=mk, color=f"C{i}", capsize=3,
                            label=f"{init} {b}" + ("" if n == len(result["setup"]["seeds"]) else f" ({n} seed)"))
                pts.append((x, r[task]["mean"]))
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=f"C{i}", lw=0.8, alpha=0.5)
        ax.set_xlabel("pretraining CPU time (s; 0 = scratch)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if result.get("partial"):
        fig.suptitle(f"PARTIAL: {len(result['missing'])} runs of the table missing", fontsize=9, color="C3")
    fig.tight_layout()
    path = out / "dense_vs_pretrain_time.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "-"
    return f"{stats['mean']:.2f} +- {stats['std']:.2f} (n={len(stats['runs'])})"


def print_table(result: dict) -> None:
    if result.get("partial"):
        print(f"PARTIAL TABLE: {len(result['missing'])} runs missing: {result['missing']}")
    print(f"{'arm':<14} {'pretrain wall/cpu s':>20} {'box AP':>22} {'mIoU':>22} {'dense wall/cpu s':>17}")
    for name, r in result["arms"].items():
        pre = f"{r['pretrain']['wall_s']:.0f}/{r['pretrain']['cpu_s']:.0f}" if "pretrain" in r else "-"
        wall = sum(r["det"]["wall_s"]) + sum(r["seg"]["wall_s"])
        cpu = sum(r["det"]["cpu_s"]) + sum(r["seg"]["cpu_s"])
        print(f"{name:<14} {pre:>20} {_cell(r['det']):>22} {_cell(r['seg']):>22} {f'{wall:.0f}/{cpu:.0f}':>17}")
    for b, g in result["gains"].items():
        print(f"{b}: {json.dumps(g)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="work_dirs/dense")
    p.add_argument("--smoke", action="store_true", help="a miniature of every step (pipeline check, not accuracy)")
    p.add_argument("--phase", choices=["test", "dev"], default="test",
                   help="test: the table on the test scenes; dev: a recipe check on the dev scenes")
    p.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=None)
    p.add_argument("--inits", nargs="+", choices=list(INITS), default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--jobs", type=int, default=None, help="programs run side by side (default 2)")
    p.add_argument("--tag", default=None, help="names a recipe variant's run folders (dev phase)")
    p.add_argument("--pretrain_only", action="store_true", help="only the pretraining runs (they serve every phase)")
    p.add_argument("--partial", action="store_true",
                   help="start nothing: tabulate the finished runs (results.json lists the missing ones)")
    p.add_argument("--plot_only", action="store_true", help="redraw the figure and the table from results.json")
    for t in TASKS:
        for k, typ in (("steps", int), ("lr", float), ("scratch_lr", float), ("layer_decay", float),
                       ("input_size", int), ("batch", int), ("width", int)):
            p.add_argument(f"--{t}_{k}", type=typ, default=None, help=f"{t} recipe: {k} (default: Config)")
        p.add_argument(f"--{t}_ratio_range", type=float, nargs=2, default=None)
    p.add_argument("--pretrain_epochs", type=int, default=None)
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    if a.plot_only:
        result = json.loads((out / "results.json").read_text())
        plot(result, out)
        print_table(result)
        return 0
    cfg = smoke_config(out) if a.smoke else Config(out=out)
    for k in ("backbones", "inits", "seeds"):
        if getattr(a, k) is not None:
            setattr(cfg, k, tuple(getattr(a, k)))
    for k in ("jobs", "tag", "pretrain_epochs"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    for t in TASKS:
        changes = {k: getattr(a, f"{t}_{k}") for k in ("steps", "lr", "scratch_lr", "layer_decay", "input_size",
                                                      "batch", "width", "ratio_range")
                   if getattr(a, f"{t}_{k}") is not None}
        if "ratio_range" in changes:
            changes["ratio_range"] = tuple(changes["ratio_range"])
        setattr(cfg, t, replace(getattr(cfg, t), **changes))
    if a.pretrain_only:
        prepare_data(cfg)
        done = run_jobs([j for j in plan(cfg, a.phase) if j.key[0] == "pretrain"], cfg.jobs)
        print(json.dumps({"/".join(k[1:]): v for k, v in done.items()}, indent=1))
        return 0
    result = run_table(cfg, a.phase, partial=a.partial)
    if a.phase == "test":
        plot(result, out)
    print_table(result)
    print(f"programs: {result['program_wall_s_sum']:.0f} wall s, {result['program_cpu_s_sum']:.0f} CPU s in all; "
          f"this invocation {result['invocation_wall_s']:.0f} s; "
          f"{'results in ' + str(out / 'results.json') if a.phase == 'test' else 'appended to dev_results.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
