"""Re-run a newcomer's 23 mistakes through the real programs and judge each message by rules.

    nice -n 10 env OMP_NUM_THREADS=1 python tools/newcomer_rerun.py --side after              # this checkout
    nice -n 10 env OMP_NUM_THREADS=1 python tools/newcomer_rerun.py --side before --repo OLD  # another checkout

Each run builds the tiny fixtures offline with this checkout's makers (tools/make_tiny_coco.py,
segmentation/toy.py, tools/make_shards.py, tests/tiny_data.py image folders); the checkpoints a mistake
needs (a pico pretraining run, a finetuned classifier, a Mask R-CNN and a segmentation run) are written
by the programs of the checkout under test (``--repo``, run with its ``.venv`` when it has one). Every
mistake then runs as a user runs it: in a session of its own, killed with its whole process group at
``--timeout`` seconds. Per run: the exit status, the seconds, the message a user reads first
(tools/fault_rerun.py's ``Run.message``), the number of output lines and whether a traceback appeared.

The verdict follows from rules, the same for both sides: a process still alive at the limit is a
hang; a traceback is a traceback; a mistake that should be refused but exits 0 is silent; otherwise the
message must hold the row's expected words (the fix: the flag or file to use) and none of its
forbidden ones, else it is "fix not named". A mistake whose right answer is to work (the checkpoint
carries what the user left out) must exit 0. The side's rows go into benchmarks/newcomer_rerun.json;
benchmarks/newcomer_rerun.md is rewritten from both sides. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from programs import kill_leftovers, session_members  # noqa: E402  (tests/programs.py: the session's live processes)
from tools.fault_rerun import Run  # noqa: E402  (what a run shows a user: its first message line)

OUT = ROOT / "benchmarks" / "newcomer_rerun"
IDLE_S = 20.0  # a session that used no CPU for this long while alive is hung (a starved one still gains CPU)
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by ``pids`` (and their reaped children)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return total / TICK


def run(cmd: list[str], timeout: float) -> tuple[Run, float]:
    """Run ``cmd`` in a session of its own as a user would; kill the whole session when it has used no CPU
    for IDLE_S seconds (hung: e.g. joining workers that ignore SIGTERM) or at ``timeout`` s. Returns the run
    (rc None: killed) and the CPU seconds of its main process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
                                start_new_session=True)
        rc, cpu, used, still = None, 0.0, -1.0, time.monotonic()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                rc, cpu = os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
                break
            now = time.monotonic()
            spent = _cpu_seconds(session_members(proc.pid))
            if spent > used + 0.01:
                used, still = spent, now
            if now - t0 > timeout or now - still > IDLE_S:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                cpu = usage.ru_utime + usage.ru_stime
                break
            time.sleep(0.5)
        seconds = time.monotonic() - t0 if rc is not None else still - t0  # killed: when it last worked
        left = kill_leftovers(proc.pid)
        log.seek(0)
        output = log.read()
    return Run(cmd, rc, round(seconds, 1), output, left, 0.0), round(cpu, 1)

# the tiny runs of each program (flags every version of the programs has)
PRE = ["main_pretrain.py", "--model", "mae_swin_pico_128", "--mask_regular", "--device", "cpu", "--log_dir", "",
       "--batch_size", "2", "--epochs", "1", "--num_workers", "0", "--warmup_epochs", "0"]
FT = ["main_finetune.py", "--model", "swin_pico_128", "--batch_size", "2", "--epochs", "1", "--num_workers", "0",
      "--warmup_epochs", "0", "--device", "cpu", "--log_dir", "", "--input_size", "64"]
DET = ["main_detection.py", "--model", "swin_pico_128", "--input_size", "64", "--test_size", "64", "64",
       "--batch_size", "2", "--adapter_dim", "32", "--fpn_dim", "32", "--num_workers", "0", "--device", "cpu",
       "--log_dir", "", "--epochs", "1"]
SEG = ["main_segmentation.py", "--model", "swin_pico_128", "--input_size", "64", "--img_scale", "96", "64",
       "--batch_size", "2", "--warmup_iters", "1", "--num_workers", "0", "--device", "cpu", "--log_dir", "",
       "--test_stride", "48", "--iters", "2", "--eval_interval", "2"]
SEG_HEADS = ["--channels", "64", "--aux_channels", "32", "--nb_classes", "4"]


@dataclass(frozen=True)
class Mistake:
    """One row of the table: what the user did, the command (built from the fixtures), and what the
    right answer holds: ``works`` (exit 0) or a refusal whose message has every ``expect`` word and no
    ``forbid`` word."""
    num: int
    program: str
    what: str
    command: Callable[["Fixtures"], list]
    expect: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    works: bool = False


class Fixtures:
    """Tiny data under ``work`` (built here, offline) and the checkpoints the checkout under test writes."""

    def __init__(self, work: Path, repo: Path, python: str, timeout: float) -> None:
        self.work, self.repo, self.python, self.timeout = work, repo, python, timeout
        self.notes: list[str] = []
        from segmentation.toy import make_toy_ade
        from tiny_data import make_images, make_labelled
        from tools.make_tiny_coco import make_tiny_coco
        self.images = make_images(work / "images", n=8, size=64)
        self.labelled = make_labelled(work / "labelled", per_class=2, size=64)
        self.coco = make_tiny_coco(work / "coco", n_train=4, n_val=2, size=64)
        self.toy = make_toy_ade(work / "toy", n_train=4, n_val=2)
        self.shards = work / "shards"
        self.tool(ROOT / "tools" / "make_shards.py", "--data_path", self.labelled, "--output_dir", self.shards,
                  "--shard_size", "4", python=sys.executable)
        self.pretrained = self.checkpoint("pre", PRE, "--data_path", self.images)
        self.finetuned = self.checkpoint("ft", FT, "--data_path", self.labelled, "--finetune", self.pretrained)
        self.mask_rcnn = self.checkpoint("det", DET, "--data_path", self.coco, "--detector", "mask_rcnn",
                                         "--warmup_iters", "1")
        self.segmented = self.checkpoint("seg", SEG, "--data_path", self.toy, *SEG_HEADS)

    def prog(self, name: str) -> str:
        return str(self.repo / name)

    def tool(self, *cmd, python: Optional[str] = None) -> Run:
        r, _ = run([python or self.python, *map(str, cmd)], timeout=1800)
        if r.rc != 0:
            raise RuntimeError(f"fixture step failed: {' '.join(map(str, cmd))}\n{r.output[-3000:]}")
        return r

    def checkpoint(self, name: str, base: list, *extra) -> Path:
        """The newest checkpoint of a one-epoch run of ``base`` by the checkout under test."""
        out = self.work / name
        self.tool(self.prog(base[0]), *base[1:], *extra, "--output_dir", out)
        found = sorted(out.glob("checkpoint-*.pth"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise RuntimeError(f"fixture step {name} wrote no checkpoint in {out}")
        return found[-1]

    def copy(self, src: Path, name: str) -> Path:
        dst = self.work / "edits" / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        return dst

    def out(self, name: str) -> Path:
        return self.work / "runs" / name


def _without(cmd: list, name: str) -> list:
    """``cmd`` without flag ``name`` and its value."""
    i = cmd.index(name)
    return cmd[:i] + cmd[i + 2:]


def _coco_renamed(f: Fixtures) -> Path:
    d = f.copy(f.coco, "coco_renamed")
    (d / "annotations" / "instances_train2017.json").rename(d / "annotations" / "instances_train.json")
    return d


def _coco_edit(f: Fixtures, name: str, edit: Callable[[Path, dict], None]) -> Path:
    d = f.copy(f.coco, name)
    path = d / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    edit(d, data)
    path.write_text(json.dumps(data))
    return d


def _no_categories(f: Fixtures) -> Path:
    return _coco_edit(f, "coco_nocat", lambda d, data: data.pop("categories"))


def _missing_image(f: Fixtures) -> Path:
    def edit(d: Path, data: dict) -> None:
        (d / "train2017" / data["images"][-1]["file_name"]).unlink()
    return _coco_edit(f, "coco_missing", edit)


def _labels_edit(f: Fixtures, name: str, edit: Callable) -> Path:
    import numpy as np
    from PIL import Image
    d = f.copy(f.toy, name)
    for split in ("training", "validation"):
        for p in sorted((d / "annotations" / split).glob("*.png")):
            edit(p, np.array(Image.open(p)))
    return d


def _label_9(f: Fixtures) -> Path:
    from PIL import Image

    def edit(p, a):
        a[a == 4] = 9
        Image.fromarray(a).save(p)
    return _labels_edit(f, "toy_label9", edit)


def _rgb_labels(f: Fixtures) -> Path:
    import numpy as np
    from PIL import Image
    return _labels_edit(f, "toy_rgb", lambda p, a: Image.fromarray(np.stack([a * 40] * 3, -1).astype(np.uint8)).save(p))


def _folder_above(f: Fixtures) -> Path:
    d = f.work / "edits" / "above"
    if not d.exists():
        d.mkdir(parents=True)
        shutil.copytree(f.toy, d / "ADEChallengeData2016")
    return d


def _full_shard_dir(f: Fixtures) -> Path:
    return f.copy(f.shards, "shards_again")


MISTAKES = [
    Mistake(1, "detection", "annotation file named instances_train.json",
            lambda f: [f.prog(DET[0]), *DET[1:], "--data_path", _coco_renamed(f), "--output_dir", f.out("m1")],
            expect=("instances_train2017.json",)),
    Mistake(2, "detection", "COCO JSON without categories",
            lambda f: [f.prog(DET[0]), *DET[1:], "--data_path", _no_categories(f), "--output_dir", f.out("m2"),
                       "--warmup_iters", "1"],
            expect=("categories",)),
    Mistake(3, "detection", "an image listed in the JSON but missing on disk",
            lambda f: [f.prog(DET[0]), *DET[1:], "--data_path", _missing_image(f), "--output_dir", f.out("m3"),
                       "--warmup_iters", "1", "--num_workers", "1"],
            expect=("skipping", "000003.png"), works=True),
    Mistake(4, "detection", "a pretraining checkpoint given to --resume",
            lambda f: [f.prog(DET[0]), *DET[1:], "--data_path", f.coco, "--output_dir", f.out("m4"),
                       "--resume", f.pretrained],
            expect=("--finetune",), forbid=("--model mae_",)),
    Mistake(5, "detection", "a finetuned classifier checkpoint given to --resume --eval",
            lambda f: [f.prog(DET[0]), *DET[1:], "--data_path", f.coco, "--output_dir", f.out("m5"),
                       "--eval", "--resume", f.finetuned],
            expect=("--finetune",)),
    Mistake(6, "detection", "--eval --resume of a Mask R-CNN checkpoint without --detector mask_rcnn",
            lambda f: [f.prog(DET[0]), *DET[1:], "--data_path", f.coco, "--output_dir", f.out("m6"),
                       "--eval", "--resume", f.mask_rcnn],
            works=True),
    Mistake(7, "detection", "--eval with neither --resume nor --finetune",
            lambda f: [f.prog(DET[0]), *DET[1:], "--data_path", f.coco, "--output_dir", f.out("m7"), "--eval"],
            expect=("--resume",)),
    Mistake(8, "detection", "the default --warmup_iters 2000 on a 4-step smoke run",
            lambda f: [f.prog(DET[0]), *DET[1:], "--data_path", f.coco, "--output_dir", f.out("m8")],
            expect=("--warmup_iters",)),
    Mistake(9, "segmentation", "label value 9 while --nb_classes 4 (one DataLoader worker)",
            lambda f: [f.prog(SEG[0]), *SEG[1:], *SEG_HEADS, "--data_path", _label_9(f), "--output_dir",
                       f.out("m9"), "--num_workers", "1"],
            expect=("--nb_classes",)),
    Mistake(10, "segmentation", "RGB colour label maps (one DataLoader worker)",
            lambda f: [f.prog(SEG[0]), *SEG[1:], *SEG_HEADS, "--data_path", _rgb_labels(f), "--output_dir",
                       f.out("m10"), "--num_workers", "1"],
            expect=("single-channel",)),
    Mistake(11, "segmentation", "a 4-class toy set trained with the default --nb_classes 150",
            lambda f: [f.prog(SEG[0]), *SEG[1:], "--channels", "32", "--aux_channels", "16", "--data_path", f.toy,
                       "--output_dir", f.out("m11")],
            expect=("--nb_classes 4",), works=True),
    Mistake(12, "segmentation", "--data_path is the folder above ADEChallengeData2016/",
            lambda f: [f.prog(SEG[0]), *SEG[1:], *SEG_HEADS, "--data_path", _folder_above(f), "--output_dir",
                       f.out("m12")],
            expect=("images/training/", "images/validation/", "--data_path", "ADEChallengeData2016")),
    Mistake(13, "segmentation", "--eval without the run's --channels 64 --aux_channels 32",
            lambda f: [f.prog(SEG[0]), *SEG[1:], "--data_path", f.toy, "--output_dir", f.out("m13"), "--eval",
                       "--resume", f.segmented],
            works=True),
    Mistake(14, "shards", "a shard pattern matching nothing",
            lambda f: [f.prog(PRE[0]), *PRE[1:], "--data_path", str(f.shards / "train-{000010..000019}.tar"),
                       "--output_dir", f.out("m14")],
            expect=("does not exist",)),
    Mistake(15, "shards", "a finetuning shard pattern without {split}",
            lambda f: [f.prog(FT[0]), *FT[1:], "--data_path", str(f.shards / "train-{000000..000001}.tar"),
                       "--output_dir", f.out("m15")],
            expect=("{split}",)),
    Mistake(16, "shards", "make_shards.py into a folder that already holds shards",
            lambda f: [f.prog("tools/make_shards.py"), "--data_path", f.labelled, "--output_dir", _full_shard_dir(f)],
            expect=("already holds",)),
    Mistake(17, "decode", "--decode gpu without a GPU",
            lambda f: [f.prog(PRE[0]), *_without(PRE[1:], "--device"), "--data_path", f.images, "--output_dir",
                       f.out("m17"), "--decode", "gpu"],
            expect=("--decode fast",), forbid=("--device cpu",)),
    Mistake(18, "decode", "--decode fast in main_finetune.py",
            lambda f: [f.prog(FT[0]), *FT[1:], "--data_path", f.labelled, "--output_dir", f.out("m18"), "--decode",
                       "fast"],
            expect=("unrecognized arguments: --decode fast", "--help")),
    Mistake(19, "reconstruct", "a finetuned classifier's checkpoint",
            lambda f: [f.prog("tools/reconstruct.py"), "--checkpoint", f.finetuned, "--images", f.images, "--output",
                       f.work / "m19.png"],
            expect=("mae_swin_pico_128",), forbid=("--model",)),
    Mistake(20, "export", "--model pvt_pico_128 for a Swin checkpoint",
            lambda f: [f.prog("tools/export_backbone.py"), "--checkpoint", f.finetuned, "--model", "pvt_pico_128",
                       "--output", f.out("m20")],
            expect=("swin_pico_128",)),
    Mistake(21, "export", "--model mae_swin_pico_128 (the pretraining name)",
            lambda f: [f.prog("tools/export_backbone.py"), "--checkpoint", f.pretrained, "--model",
                       "mae_swin_pico_128", "--output", f.out("m21")],
            expect=("--model swin_pico_128",)),
    Mistake(22, "export", "a detection checkpoint",
            lambda f: [f.prog("tools/export_backbone.py"), "--checkpoint", f.mask_rcnn, "--model", "swin_pico_128",
                       "--output", f.out("m22")],
            works=True),
    Mistake(23, "main_pretrain", "a classifier name (--model swin_pico_128)",
            lambda f: [f.prog(PRE[0]), *PRE[1:], "--model", "swin_pico_128", "--data_path", f.images, "--output_dir",
                       f.out("m23")],
            expect=("mae_swin_pico_128", "simmim_swin_pico_128")),
]


def verdict(m: Mistake, r: Run, timeout: float) -> tuple[str, str]:
    """(verdict, reason) by the rules of the module docstring."""
    text = r.message()
    if r.rc is None:
        return "hang", (f"alive after {timeout:.0f} s" if r.seconds >= timeout else
                        f"alive, no CPU used for {IDLE_S:.0f} s")
    if r.left:
        return "hang", "processes left after the exit"
    if r.traceback:
        return "traceback", text[:120]
    if m.works:
        if r.rc != 0:
            return "refused", f"exit {r.rc}"
        missing = [w for w in m.expect if w.lower() not in r.output.lower()]
        return ("works", "") if not missing else ("works, no hint", f"no {missing}")
    if r.rc == 0:
        return "silent", "exit 0"
    missing = [w for w in m.expect if w.lower() not in text.lower()]
    wrong = [w for w in m.forbid if w.lower() in text.lower()]
    if missing or wrong:
        return "fix not named", "; ".join(x for x in (f"lacks {missing}" if missing else "",
                                                      f"has {wrong}" if wrong else "") if x)
    return "clear", ""


GOOD = ("clear", "works")


def run_side(repo: Path, python: str, timeout: float, only: set[int], record: Callable[[dict], None]) -> dict:
    """Every mistake (or those in ``only``) against ``repo``; ``record(rows)`` after each."""
    rows = {}
    with tempfile.TemporaryDirectory(prefix="newcomer_") as tmp:
        t0 = time.monotonic()
        fixtures = Fixtures(Path(tmp), repo, python, timeout)
        print(f"fixtures ready in {time.monotonic() - t0:.0f} s", flush=True)
        for m in MISTAKES:
            if only and m.num not in only:
                continue
            cmd = [str(c) for c in m.command(fixtures)]
            r, cpu = run([python, *cmd], timeout)
            v, why = verdict(m, r, timeout)
            lines = [ln for ln in r.output.splitlines() if ln.strip()]
            rows[str(m.num)] = {"program": m.program, "mistake": m.what, "rc": r.rc, "seconds": r.seconds,
                                "cpu_seconds": cpu, "message": r.message().replace(tmp, "(tmp)")[:400],
                                "lines": len(lines), "traceback": r.traceback, "hung": v == "hang", "verdict": v,
                                "reason": why, "command": " ".join(c.replace(tmp, "(tmp)") for c in cmd)}
            print(f"{m.num:>2} {v:<14} rc={r.rc} {r.seconds:5.1f}s cpu {cpu:4.1f}s  "
                  f"{rows[str(m.num)]['message'][:100]}", flush=True)
            record(rows)
    return rows


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return "—"
    msg = row["message"].replace("|", "\\|")
    msg = msg if len(msg) <= 160 else msg[:157] + "..."
    rc = "killed" if row["hung"] else row["rc"]
    return f"`{msg}` (rc {rc}, {row['seconds']} s, {row.get('cpu_seconds', '?')} CPU-s, {row['lines']} lines)"


def write_markdown(data: dict) -> str:
    before, after = data.get("before", {}).get("rows", {}), data.get("after", {}).get("rows", {})
    out = ["# A newcomer's 23 mistakes, before and after", "",
           "Written by `tools/newcomer_rerun.py` (verdicts by its rules: hang, traceback, silent exit 0, or the "
           "message checked for the words that name the fix). Message = the line a user reads first.", ""]
    for side in ("before", "after"):
        if side in data:
            s = data[side]
            out.append(f"- {side}: `{s['repo']}` at {s['commit']}, {s['when']}; {s['machine']}")
    good = sum(1 for r in after.values() if r["verdict"] in GOOD)
    was = sum(1 for r in before.values() if r["verdict"] in GOOD)
    out += ["", f"One clear message naming the fix (or a run that works): before {was} of {len(before) or '—'}, "
                f"after {good} of {len(after) or '—'}.", "",
            "| # | program: mistake | before | before verdict | after | after verdict |", "|---|---|---|---|---|---|"]
    for m in MISTAKES:
        b, a = before.get(str(m.num)), after.get(str(m.num))
        verdict_text = lambda r: "—" if r is None else r["verdict"] + (f" ({r['reason']})" if r["reason"] else "")
        out.append(f"| {m.num} | {m.program}: {m.what} | {_cell(b)} | {verdict_text(b)} | {_cell(a)} | "
                   f"{verdict_text(a)} |")
    return "\n".join(out) + "\n"


def _commit(repo: Path) -> str:
    import subprocess
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=str(ROOT), help="the checkout whose programs run (default: this one)")
    p.add_argument("--side", default="after", choices=["before", "after"], help="the table column it fills")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before a run's process group is killed (a run idle for IDLE_S s is killed sooner)")
    p.add_argument("--only", type=int, nargs="*", default=[], help="these mistakes only (their rows replace those "
                                                                   "in the JSON)")
    a = p.parse_args()
    repo = Path(a.repo).resolve()
    venv = repo / ".venv" / "bin" / "python"
    python = str(venv) if venv.exists() else sys.executable
    path = OUT.with_suffix(".json")
    old = json.loads(path.read_text()).get(a.side, {}).get("rows", {}) if a.only and path.exists() else {}

    def record(rows: dict) -> None:  # after every row: an interrupted re-run keeps what it measured
        data = json.loads(path.read_text()) if path.exists() else {}  # the other side may run meanwhile
        data[a.side] = {"repo": str(repo), "commit": _commit(repo),
                        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load "
                                   f"{os.getloadavg()[0]:.1f} at the last row",
                        "timeout_s": a.timeout, "idle_s": IDLE_S, "rows": {**old, **rows}}
        path.write_text(json.dumps(data, indent=1) + "\n")
        OUT.with_suffix(".md").write_text(write_markdown(data))

    run_side(repo, python, a.timeout, set(a.only), record)
    rows = json.loads(path.read_text())[a.side]["rows"]
    good = sum(1 for r in rows.values() if r["verdict"] in GOOD)
    print(f"{a.side}: {good} of {len(rows)} give one clear message naming the fix (or work); "
          f"wrote {path} and {OUT.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
