"""Where do the dense models of the experiment fail: finding the animals, or naming them?

Reads the finished test-phase runs of tools/dense_experiment.py and evaluates their final weights on
the DEV scenes (never the test scenes), with two views that split localisation from classification:

  segmentation  mIoU (as the table), foreground IoU (any animal vs background, where the model gives
                the background class less than half the probability) and animal accuracy on the
                true-foreground pixels (argmax over the 10 animal classes only: chance is 10%);
  detection     box AP (as the table) and class-agnostic box AP (COCOeval with useCats=0: a box
                counts when it finds an animal, whatever class it names).

    python tools/dense_diagnosis.py --out work_dirs/dense            # every finished run, all seeds
    python tools/dense_diagnosis.py --out work_dirs/dense --seeds 0

Writes <out>/diagnosis.json (one row per run, and the mean per arm) and <out>/diagnosis.png, and
prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.dense_experiment import BACKBONES, INITS, _completed_run  # noqa: E402

SEG_CLASSES = 11  # background + the 10 animals (tools/make_dense_scenes.py)


def _config(program, run: Path, data: Path):
    """The run's own resolved flags (config.yaml), pointed at ``data``; weights come from the run."""
    return program.parse_args(["--config", str(run / "config.yaml"), "--data_path", str(data), "--finetune", "",
                               "--output_dir", str(run), "--resume", "", "--num_workers", "0"])


def foreground_counts(logits, label, ignore_index: int = 255) -> tuple[int, int, int, int]:
    """logits (K, H, W), class 0 the background; label (H, W) int64. Returns the pixel counts
    (foreground found AND true, found OR true, true-foreground pixels whose best animal class is right,
    true-foreground pixels). Found: the background gets less than half the probability, so a pixel can
    be found while the argmax still says background (its animal probability split over the classes)."""
    valid = label != ignore_index
    true_fg = (label > 0) & valid
    found_fg = (logits.softmax(0)[0] < 0.5) & valid
    named = ((logits[1:].argmax(0) + 1) == label) & true_fg
    return (int((true_fg & found_fg).sum()), int((true_fg | found_fg).sum()), int(named.sum()),
            int(true_fg.sum()))


def seg_diagnosis(run: Path, data: Path) -> dict:
    """mIoU, foreground IoU and animal accuracy on foreground (percent) of ``run``'s final weights on the
    validation split of ``data`` (ADE20K layout; label 0 is the background)."""
    import torch
    import torch.nn.functional as F
    import main_segmentation as prog
    from config.segmentation import ARCHITECTURE
    from engine.evaluate import load_trained_weights
    from segmentation.data import SegmentationDataset, find_pairs
    from segmentation.inference import whole_logits
    from segmentation.metrics import confusion_matrix, segmentation_metrics

    cfg = _config(prog, run, data)
    model = prog.build_model(cfg, _CpuRun())
    load_trained_weights(model, str(run / "checkpoint-last.pth"), ARCHITECTURE)
    model.eval()
    pairs = find_pairs(cfg.data_path, "val")
    val = SegmentationDataset(pairs, train=False, reduce_zero_label=cfg.reduce_zero_label, test_scale=cfg.img_scale,
                              num_classes=cfg.nb_classes)
    cm = torch.zeros(cfg.nb_classes, cfg.nb_classes, dtype=torch.long)
    fg_inter = fg_union = named = fg_pixels = 0
    for i in range(len(val)):
        img, label, ok = val[i]
        if not int(ok):
            continue
        logits = F.interpolate(whole_logits(model, img[None]), size=label.shape[-2:], mode="bilinear",
                               align_corners=False)[0]
        label = label.long()
        cm += confusion_matrix(logits.argmax(0), label, cfg.nb_classes)
        counts = foreground_counts(logits, label)
        fg_inter, fg_union = fg_inter + counts[0], fg_union + counts[1]
        named, fg_pixels = named + counts[2], fg_pixels + counts[3]
    return {"mIoU": 100 * segmentation_metrics(cm)["mIoU"], "fg_IoU": 100 * fg_inter / max(fg_union, 1),
            "animal_acc_on_fg": 100 * named / max(fg_pixels, 1), "images": len(val)}


def det_diagnosis(run: Path, data: Path) -> dict:
    """Box AP and class-agnostic box AP (percent) of ``run``'s final weights on the val split of ``data``
    (COCO layout)."""
    import functools
    import main_detection as prog
    from config.detection import ARCHITECTURE
    import torch
    from detection.coco import CocoDetection, coco_evaluate, collate, load_coco
    from detection.detector import build_detector
    from engine.evaluate import load_trained_weights
    from engine.loaders import eval_loader
    from engine_detection import predict_coco
    from util.pretrained import build_backbone

    cfg = _config(prog, run, data)
    val = CocoDetection(cfg.data_path, "val", train=False, input_size=cfg.input_size, ratio_range=cfg.ratio_range,
                        test_size=cfg.test_size, with_masks=False)
    backbone = build_backbone(cfg.model, "", drop_path=cfg.drop_path, log=lambda *a, **k: None)
    model = build_detector(cfg.detector, backbone, len(val.cat_ids), adapter_dim=cfg.adapter_dim,
                           fpn_dim=cfg.fpn_dim, neck_norm=cfg.neck_norm, score_thr=cfg.score_thr,
                           max_per_img=cfg.max_dets)
    load_trained_weights(model, str(run / "checkpoint-last.pth"), ARCHITECTURE)
    cpu = torch.device("cpu")
    loader = eval_loader(val, 1, 1, 0, 0, cpu, False, collate=functools.partial(collate, size_divisor=backbone.size_divisor))
    results, _ = predict_coco(model, loader, cpu, val)  # as main_detection.py evaluates: one image per forward
    gt = load_coco(val.ann_file)
    named = coco_evaluate(gt, results, ["bbox"])["bbox"]
    agnostic = coco_evaluate(gt, results, ["bbox"], use_cats=False)["bbox"]
    return {"AP": 100 * named["AP"], "AP50": 100 * named["AP50"], "agnostic_AP": 100 * agnostic["AP"],
            "agnostic_AP50": 100 * agnostic["AP50"], "images": len(val)}


class _CpuRun:
    """What main_segmentation.build_model reads of a run: one CPU process."""
    distributed = False

    def __init__(self):
        import torch
        self.device = torch.device("cpu")

    @staticmethod
    def log(*_a, **_k) -> None:
        pass


DIAGNOSE = {"det": (det_diagnosis, "coco_dev"), "seg": (seg_diagnosis, "ade_dev")}


def finished_runs(out: Path, seeds: list[int] | None) -> list[tuple[str, str, str, int, Path]]:
    """(task, backbone, init, seed, folder) of every completed test-phase run under ``out``."""
    found = []
    for task in DIAGNOSE:
        for run in sorted((out / "test" / task).glob("*_seed*")):
            init, backbone_seed = run.name.split("_", 1)
            backbone, _, seed = backbone_seed.rpartition("_seed")
            if (init in INITS and backbone in BACKBONES and seed.isdigit() and (seeds is None or int(seed) in seeds)
                    and _completed_run(run)):
                found.append((task, backbone, init, int(seed), run))
    return found


def _weights_stamp(run: Path) -> list:
    st = (run / "checkpoint-last.pth").stat()
    return [st.st_size, st.st_mtime_ns]


def diagnose(out: Path, seeds: list[int] | None = None, log=print) -> dict:
    """Every finished run's row (kept beside its weights in diagnosis_dev.json, and reused while the
    weights are the same file), the mean per arm; written to <out>/diagnosis.json."""
    rows, means = [], {}
    for task, backbone, init, seed, run in finished_runs(out, seeds):
        fn, data = DIAGNOSE[task]
        cache = run / "diagnosis_dev.json"
        try:
            kept = json.loads(cache.read_text())
        except (OSError, ValueError):
            kept = {}
        if kept.get("weights") == _weights_stamp(run):
            row = kept["row"]
        else:
            row = {"task": task, "backbone": backbone, "init": init, "seed": seed, **fn(run, out / "data" / data)}
            cache.write_text(json.dumps({"weights": _weights_stamp(run), "row": row}, indent=1))
        log(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
        rows.append(row)
    for row in rows:
        arm = means.setdefault(row["task"], {}).setdefault(f"{row['init']}_{row['backbone']}", {"seeds": []})
        arm["seeds"].append(row["seed"])
        for k, v in row.items():
            if isinstance(v, float):
                arm.setdefault(k, []).append(v)
    for arms in means.values():
        for arm in arms.values():
            for k, v in list(arm.items()):
                if k != "seeds":
                    arm[k] = sum(v) / len(v)
    result = {"split": "dev", "runs": rows, "mean": means}
    (out / "diagnosis.json").write_text(json.dumps(result, indent=1))
    return result


def print_table(result: dict) -> None:
    columns = {"det": ("AP", "agnostic_AP", "agnostic_AP50"), "seg": ("mIoU", "fg_IoU", "animal_acc_on_fg")}
    for task, arms in result["mean"].items():
        print(f"\n{task} on the dev scenes (mean over seeds)")
        print(f"{'arm':16s} {'seeds':>6s} " + " ".join(f"{c:>17s}" for c in columns[task]))
        for name, arm in sorted(arms.items()):
            print(f"{name:16s} {len(arm['seeds']):6d} " + " ".join(f"{arm[c]:17.2f}" for c in columns[task]))


def plot(result: dict, path: Path) -> Path:
    """Bars per arm (mean over seeds, a dot per seed): what the table measures beside the finding-only
    view of each task, and the animal accuracy against its 10 % chance level."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (("det", ("AP", "agnostic_AP"), ("box AP", "class-agnostic box AP")),
              ("seg", ("mIoU", "fg_IoU"), ("mIoU", "foreground IoU")),
              ("seg", ("animal_acc_on_fg",), ("animal accuracy on foreground pixels",)))
    arms = [f"{i}_{b}" for b in BACKBONES for i in INITS]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (task, keys, labels) in zip(axes, panels):
        width = 0.8 / len(keys)
        for k, (key, label) in enumerate(zip(keys, labels)):
            xs = [a + (k - (len(keys) - 1) / 2) * width for a in range(len(arms))]
            means = [result["mean"].get(task, {}).get(arm, {}).get(key, float("nan")) for arm in arms]
            ax.bar(xs, means, width, label=label, color=f"C{k}")
            for x, arm in zip(xs, arms):
                seeds = [r[key] for r in result["runs"] if r["task"] == task and f"{r['init']}_{r['backbone']}" == arm]
                ax.plot([x] * len(seeds), seeds, "k.", ms=3)
        if keys == ("animal_acc_on_fg",):
            ax.axhline(100 / (SEG_CLASSES - 1), color="C3", ls="--", lw=1, label="chance (10 %)")
        ax.set_xticks(range(len(arms)), [a.replace("_", "\n") for a in arms], fontsize=7)
        ax.set_title(f"{'GFL' if task == 'det' else 'UperNet'}, dev scenes", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the dense experiment's folder (its --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: every finished seed")
    a = p.parse_args(argv)
    if not (a.out / "test").is_dir():
        p.error(f"--out {a.out}: no test/ folder of finished runs; run tools/dense_experiment.py --out {a.out} first")
    import torch
    torch.manual_seed(0)
    result = diagnose(a.out, a.seeds)
    if not result["runs"]:
        print(f"no finished test-phase run under {a.out}", file=sys.stderr)
        return 1
    print_table(result)
    print(f"\nwritten: {a.out / 'diagnosis.json'}, {plot(result, a.out / 'diagnosis.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
