"""Detection's part of the loop (engine.trainer.Task): the detector's losses, COCO box (and mask)
AP every --eval_freq epochs and after the last, the best box AP, and --eval's evaluation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from config.detection import DetectConfig
from detection.coco import CocoDetection, coco_evaluate, to_coco_results
from engine.distributed import get_world_size, is_dist, is_main_process
from engine.run import Run
from engine.step import StepOutput, autocast
from engine.trainer import Evaluation, Task


@torch.no_grad()
def evaluate(model, loader, device, dataset: CocoDetection, amp: str = "none", with_masks: bool = False) -> dict:
    """COCO box (and mask) AP of ``loader``'s images; each rank predicts its shard, rank 0 gathers
    the results and runs pycocotools. Returns {"bbox": {AP, ...}, ["segm": ...]} on rank 0, {} elsewhere."""
    model.eval()
    results = []
    for imgs, _, metas in loader:
        with autocast(amp, device):
            dets = model(imgs.to(device, non_blocking=True), [m["size"] for m in metas])
        for det, meta in zip(dets, metas):
            results += to_coco_results(det, meta, dataset.cat_ids, with_masks)
    if is_dist():
        parts = [None] * get_world_size()
        dist.all_gather_object(parts, results)
        results = [r for p in parts for r in p]
    if not is_main_process():
        return {}
    return coco_evaluate(dataset.coco, results, ["bbox", "segm"] if with_masks else ["bbox"], dataset.ids)


def summary(stats: dict) -> str:
    return "  ".join(f"{t} AP {s['AP'] * 100:.1f} AP50 {s['AP50'] * 100:.1f} AP75 {s['AP75'] * 100:.1f}"
                     for t, s in stats.items())


class DetectTask(Task):
    """GFL or Mask R-CNN on a classifier backbone (detection.detector)."""

    best_key = "best_ap"

    def __init__(self, config: DetectConfig, model: torch.nn.Module, train_model: torch.nn.Module, run: Run,
                 val_loader, val_set: CocoDetection) -> None:
        self.config, self.model, self.train_model, self.run = config, model, train_model, run
        self.val_loader, self.val_set = val_loader, val_set
        self.what = f"{config.detector} on {config.model}"

    def compute_loss(self, batch) -> StepOutput:
        imgs, targets, metas = batch
        device = self.run.device
        losses = self.train_model(imgs.to(device, non_blocking=True), [m["size"] for m in metas],
                                  [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])
        return StepOutput(sum(losses.values()), imgs.shape[0], means={k: float(v.detach()) for k, v in losses.items()})

    def evaluate(self, period: Optional[int]) -> Evaluation:
        c = self.config
        stats = evaluate(self.model, self.val_loader, self.run.device, self.val_set, c.amp, c.with_masks)
        return Evaluation(stats, stats["bbox"]["AP"] if stats else None,
                          record={f"test_{t}_{k}": v for t, s in stats.items() for k, v in s.items()})

    def log(self, period: int, stats: dict, evaluation: Optional[Evaluation]) -> None:
        found = evaluation.metrics if evaluation is not None else {}
        if found:
            print(f"epoch {period}: {summary(found)} (best box AP {evaluation.best * 100:.1f})", flush=True)
            (Path(self.config.output_dir) / f"eval_epoch{period}.json").write_text(
                json.dumps({"epoch": period, **found}, indent=1))
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
        parts = [f"last {summary(found)}"] if found else []
        parts.append(f"best box AP {best * 100:.1f}")
        return parts, dict(best_ap=best, final_train=stats or None, final_val=found or None)

    def report(self, evaluation: Evaluation) -> tuple[str, list[str]]:
        """--eval: COCO AP of the loaded weights on val2017; eval.json."""
        c, stats = self.config, evaluation.metrics
        print(f"evaluation of {len(self.val_set)} images: {summary(stats)}", flush=True)
        (Path(c.output_dir) / "eval.json").write_text(json.dumps({"weights": c.resume or c.finetune, **stats},
                                                                 indent=1))
        return f"{c.detector} on {c.model} evaluation", [summary(stats)]
