"""Detection's part of the loop (engine.trainer.Task): the detector's losses, COCO box (and mask)
AP every --eval_freq epochs and after the last, the best box AP, and --eval's evaluation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from config.detection import DetectConfig
from detection.coco import CocoDetection, coco_evaluate, load_coco, to_coco_results
from engine.distributed import get_world_size, is_dist, is_main_process
from engine.run import Run
from engine.step import StepOutput, autocast
from engine.trainer import Evaluation, Task


def gather_to_main(obj) -> list:
    """Every rank's ``obj``, in rank order, on rank 0 (the others get [])."""
    if not is_dist():
        return [obj]
    parts = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, parts, dst=0)
    return parts if is_main_process() else []


@torch.no_grad()
def predict_coco(model, loader, device, dataset: CocoDetection, amp: str = "none", with_masks: bool = False
                 ) -> tuple[list[dict], list[int]]:
    """``model``'s detections on ``loader``'s images as COCO results, and the ids of the unreadable
    images (left out); this process's share only (evaluate gathers and scores them)."""
    model.eval()
    results, unreadable = [], []
    for imgs, _, metas in loader:
        readable = [k for k, m in enumerate(metas) if "error" not in m]
        unreadable += [m["image_id"] for m in metas if "error" in m]
        if not readable:
            continue
        with autocast(amp, device):
            dets = model(imgs[readable].to(device, non_blocking=True), [metas[k]["size"] for k in readable])
        for det, k in zip(dets, readable):
            results += to_coco_results(det, metas[k], dataset.cat_ids, with_masks)
    return results, unreadable


@torch.no_grad()
def evaluate(model, loader, device, dataset: CocoDetection, amp: str = "none", with_masks: bool = False
             ) -> tuple[dict, int]:
    """COCO box (and mask) AP of ``loader``'s images (one image per batch: an image's detections never
    depend on a batch partner's padding, so neither do the numbers on --batch_size or the world size).

    Each rank predicts its shard and turns the detections into COCO results (masks pasted at the
    original size and thresholded on the device, then RLE-encoded); rank 0 gathers them, loads the
    ground truth and runs pycocotools. Unreadable images (named by the loader) are left out of the
    scoring. Returns ({"bbox": {AP, ...}, ["segm": ...]}, unreadable images) on rank 0, ({}, 0) elsewhere."""
    results, unreadable = predict_coco(model, loader, device, dataset, amp, with_masks)
    parts = gather_to_main((results, unreadable))
    if not is_main_process():
        return {}, 0
    results = [r for part, _ in parts for r in part]
    missing = {i for _, part in parts for i in part}
    scored = [i for i in dataset.ids.tolist() if i not in missing]
    coco_gt = load_coco(dataset.ann_file)  # rank 0, for this scoring only
    return coco_evaluate(coco_gt, results, ["bbox", "segm"] if with_masks else ["bbox"], scored), len(missing)


def summary(stats: dict, unreadable: int = 0) -> str:
    text = "  ".join(f"{t} AP {s['AP'] * 100:.1f} AP50 {s['AP50'] * 100:.1f} AP75 {s['AP75'] * 100:.1f}"
                     for t, s in stats.items())
    return text + (f" ({unreadable} unreadable images not scored)" if unreadable else "")


class DetectTask(Task):
    """GFL or Mask R-CNN on a classifier backbone (detection.detector)."""

    best_key = "best_ap"

    def __init__(self, config: DetectConfig, model: torch.nn.Module, train_model: torch.nn.Module, run: Run,
                 val_loader, val_set: CocoDetection) -> None:
        self.config, self.model, self.train_model, self.run = config, model, train_model, run
        self.val_loader, self.val_set = val_loader, val_set
        self.what = f"{config.detector} on {config.model}"
        self.unreadable = 0  # images of the last evaluation that could not be read (not scored)

    def compute_loss(self, batch) -> StepOutput:
        imgs, targets, metas = batch
        device = self.run.device
        losses = self.train_model(imgs.to(device, non_blocking=True), [m["size"] for m in metas],
                                  [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])
        # the loss terms stay on the device (no host sync per step): the step loop averages them per period
        return StepOutput(sum(losses.values()), imgs.shape[0], {"skipped_images": sum(m.get("replaced", 0) for m in metas)},
                          means={k: v.detach().float() for k, v in losses.items()})

    def evaluate(self, period: Optional[int]) -> Evaluation:
        c = self.config
        stats, unreadable = evaluate(self.model, self.val_loader, self.run.device, self.val_set, c.amp, c.with_masks)
        record = {f"test_{t}_{k}": v for t, s in stats.items() for k, v in s.items()}
        if unreadable:
            record["test_unreadable_images"] = unreadable
        self.unreadable = unreadable
        return Evaluation(stats, stats["bbox"]["AP"] if stats else None, record=record)

    def log(self, period: int, stats: dict, evaluation: Optional[Evaluation]) -> None:
        found = evaluation.metrics if evaluation is not None else {}
        if found:
            print(f"epoch {period}: {summary(found, self.unreadable)} (best box AP {evaluation.best * 100:.1f})",
                  flush=True)
            (Path(self.config.output_dir) / f"eval_epoch{period}.json").write_text(
                json.dumps({"epoch": period, **found, "unreadable_images": self.unreadable}, indent=1))
        writer = self.run.log_writer
        if writer is not None:
            for t, s in found.items():
                for k in ("AP", "AP50", "AP75"):
                    writer.add_scalar(f"val/{t}_{k}", s[k], period)
            for k in [k for k in stats if k.startswith("loss_")]:
                writer.add_scalar(f"epoch/{k}", stats[k], period)

    def best_text(self, best: float) -> str:
        return f"best box AP {best * 100:.1f}"

    def finish(self, stats: dict, evaluation: Optional[Evaluation], best: float,
               best_period: Optional[int]) -> tuple[list[str], dict]:
        found = evaluation.metrics if evaluation is not None else {}
        parts = [f"last {summary(found, self.unreadable)}"] if found else []
        parts.append(f"best box AP {best * 100:.1f}")
        return parts, dict(best_ap=best, final_train=stats or None, final_val=found or None)

    def report(self, evaluation: Evaluation) -> tuple[str, list[str]]:
        """--eval: COCO AP of the loaded weights on val2017; eval.json."""
        c, stats = self.config, evaluation.metrics
        print(f"evaluation of {len(self.val_set) - self.unreadable} images: {summary(stats, self.unreadable)}",
              flush=True)
        (Path(c.output_dir) / "eval.json").write_text(json.dumps(
            {"weights": c.resume or c.finetune, **stats, "unreadable_images": self.unreadable}, indent=1))
        return f"{c.detector} on {c.model} evaluation", [summary(stats, self.unreadable)]
