"""Pretraining's part of the loop (engine.trainer.Task): masks drawn on the device, the masked-image-
modeling loss, reconstruction figures and the summary."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from config.pretrain import PretrainConfig
from engine.distributed import get_rank, get_world_size, is_main_process
from engine.monitor import FeatureMonitor, MonitorResult, best_of, rngs_untouched
from engine.record import CostMeter, count_flops, flops_text
from engine.run import Run
from engine.step import StepOutput
from engine.trainer import Evaluation, Task
from models.masking import draw_masks, secondary_mask
from util.visualize import write_reconstruction

FIGURE_SEED = 12345  # the same masks in every figure of a run


class MaskSampler:
    """Draws the masks of each global batch on the training device from a seeded generator.

    Every rank draws the masks of the whole global batch (a few KB) from the same
    generator and keeps its own rows (rank, rank + W, ...: the rows of the samples
    the DistributedSampler gave it), so the masks of a sample do not depend on the
    number of processes, and the generator is reseeded per epoch for exact resume.
    """

    def __init__(self, token_size: int, mask_ratio: float, regular: bool, vis_mask_ratio: float,
                 seed: int, device: torch.device, rounding: str = "keep") -> None:
        self.token_size, self.mask_ratio, self.regular = token_size, mask_ratio, regular
        self.rounding = rounding   # the model's mask_rounding (models.masking.num_removed)
        self.vis_mask_ratio = vis_mask_ratio
        self.seed = seed
        self.generator = torch.Generator(device=device)
        self.device = device

    def set_epoch(self, epoch: int, step: int = 0, batch: int = 0) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        for _ in range(step):  # replay the draws of skipped steps (mid-epoch resume)
            self(batch)

    def __call__(self, batch: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        world, rank = get_world_size(), get_rank()
        mask = draw_masks(batch * world, self.token_size, self.mask_ratio, self.regular,
                          generator=self.generator, device=self.device, rounding=self.rounding)
        sm = None
        if self.vis_mask_ratio > 0:
            sm = secondary_mask(mask, self.vis_mask_ratio, generator=self.generator)[rank::world]
        return mask[rank::world], sm


class PretrainTask(Task):
    """Masked-image modeling: ``model(imgs, mask, sm_mask)`` (models.contract.PretrainOutput) under
    masks drawn by a ``MaskSampler``; a reconstruction figure every --vis_freq epochs and at the end;
    with a ``FeatureMonitor`` its k-NN and linear probe are the evaluation (every --monitor_freq epochs)."""
    best_key = "monitor_best"   # the checkpoint field of the best monitor k-NN top-1 (--save_best_monitor)

    def __init__(self, config: PretrainConfig, model: torch.nn.Module, train_model: torch.nn.Module,
                 run: Run, figures: Optional[torch.Tensor] = None, monitor: Optional[FeatureMonitor] = None,
                 cost: Optional[CostMeter] = None) -> None:
        """``figures``: (k, 3, S, S) the images of every reconstruction figure (rank 0's)."""
        self.config, self.model, self.train_model, self.run = config, model, train_model, run
        self.figures = figures
        self.monitor = monitor
        self.monitors: list[MonitorResult] = []   # this process's monitor points
        self.cost = cost
        self.what = f"{config.model} pretraining"
        self.masks = MaskSampler(config.token_size, config.mask_ratio, config.mask_regular, config.vis_mask_ratio,
                                 seed=config.seed, device=run.device, rounding=model.contract.mask_rounding)

    def begin(self, period: int, step: int) -> None:
        self.masks.set_epoch(period, step, self.config.batch_size)

    def compute_loss(self, batch) -> StepOutput:
        imgs, _, ok = batch
        imgs = imgs.to(self.run.device, non_blocking=True)
        if self.config.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        mask, sm = self.masks(imgs.shape[0])
        out = self.train_model(imgs, mask, sm)
        return StepOutput(out.loss, imgs.shape[0], {"skipped_images": int((ok == 0).sum())})

    @property
    def evaluates(self) -> bool:
        return self.monitor is not None

    def evaluate(self, period: Optional[int]) -> Optional[Evaluation]:
        """The feature monitor (every rank): k-NN and linear-probe top-1 of the encoder as it stands."""
        result = self.monitor(period)
        self.monitors.append(result)
        score = result.knn_acc1 if self.config.save_best_monitor else None
        return Evaluation(metrics=result.record(), score=score, record=result.record())

    def period_stats(self, period: int, stats: dict) -> dict:
        if self.cost is None or not stats.get("images_per_sec"):
            return {}
        return self.cost.stats(stats["images_per_sec"], self.config.epochs - period - 1)

    def log(self, period: int, stats: dict, evaluation: Optional[Evaluation]) -> None:
        c = self.config
        if self.cost is not None and "flops_per_s" in stats:
            print(self.cost.line(stats), flush=True)
            if self.run.log_writer is not None:
                for key in ("flops_per_s", "mfu"):
                    if stats.get(key) is not None:
                        self.run.log_writer.add_scalar(f"epoch/{key}", stats[key], period)
        if evaluation is not None and self.monitors:
            print(self.monitors[-1].line(), flush=True)
            if self.run.log_writer is not None:
                for key, value in evaluation.record.items():
                    self.run.log_writer.add_scalar(f"monitor/{key.removeprefix('monitor_')}", value, period)
        if c.vis_freq > 0 and (period + 1) % c.vis_freq == 0 and period + 1 < c.epochs:
            self.figure(period)

    def best_text(self, best: float) -> str:
        return f"best monitor k-NN top-1 {best:.2f}%"

    def finish(self, stats: dict, evaluation: Optional[Evaluation], best: float,
               best_period: Optional[int]) -> tuple[list[str], dict]:
        reserved = (f" (reserved {stats['peak_reserved_mb']:.0f} MB)"
                    if stats and self.run.device.type == "cuda" and "peak_reserved_mb" in stats else "")
        parts = [f"final loss {stats['loss']:.4f}, {stats['images_per_sec']:.1f} img/s, "
                 f"peak mem {stats['peak_mem_mb']:.0f} MB{reserved}"] if stats else []
        record: dict = {"final": stats or None}
        if self.cost is not None and stats and "flops_per_s" in stats:
            mfu = f"MFU {100 * stats['mfu']:.1f}%, " if stats.get("mfu") is not None else ""
            parts.append(f"{flops_text(stats['flops_per_s'])}, {mfu}"
                         f"{stats['device_hours_per_100_epochs']:.2f} device-hours per 100 epochs")
            record["cost"] = {**self.cost.start(), **{k: stats[k] for k in (
                "flops_per_s", "mfu", "device_hours_per_100_epochs", "projected_run_device_hours",
                "projected_run_wall_s")}}
        if self.monitors:
            last, top = self.monitors[-1], best_of(self.monitors)
            parts.append(f"monitor k-NN {last.knn_acc1:.2f}%, probe {last.probe_acc1:.2f}% (best k-NN "
                         f"{top.knn_acc1:.2f}% at epoch {top.epoch}; {sum(r.seconds for r in self.monitors):.0f} s "
                         f"of monitors)")
            record["monitor"] = {"last": {"epoch": last.epoch, **last.record()},
                                 "best": {"epoch": top.epoch, **top.record()},
                                 "history": [{"epoch": r.epoch, **r.record()} for r in self.monitors]}
        return parts, record

    def complete(self, last_period: int, trained: bool) -> dict:
        """Rank 0: the final figure (unless a finished run is started again and it exists)."""
        if not is_main_process():
            return {}
        if not trained and (Path(self.config.output_dir) / f"reconstruction-{last_period}.png").exists():
            return {}
        path = self.figure(last_period).resolve()
        print(f"reconstruction figure: {path}", flush=True)
        return {"figure": str(path)}

    def figure(self, period: int) -> Path:
        """The reconstruction figure of the run's figure images (util.visualize.figure_images, picked once
        at start-up) and TensorBoard's."""
        c, device = self.config, self.run.device
        imgs = self.figures.to(device)
        gen = torch.Generator(device=device).manual_seed(FIGURE_SEED)
        mask = draw_masks(len(imgs), c.token_size, c.mask_ratio, c.mask_regular, generator=gen, device=device,
                          rounding=self.model.contract.mask_rounding)
        sm = secondary_mask(mask, c.vis_mask_ratio, generator=gen) if c.vis_mask_ratio > 0 else None
        path = write_reconstruction(self.model, imgs, mask, sm, Path(c.output_dir) / f"reconstruction-{period}.png",
                                    f"{c.model}, epoch {period}", c.denorm, pixels=c.pixels)
        writer = self.run.log_writer
        if writer is not None:
            import numpy as np
            from PIL import Image
            writer.add_image("reconstruction", np.asarray(Image.open(path).convert("RGB")), period, dataformats="HWC")
        return path


def sample_batch(config: PretrainConfig, model: torch.nn.Module, batch: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Random images (batch, C, S, S), C = --in_chans, with masks drawn as the run draws them (mask,
    secondary mask)."""
    size = config.input_size
    imgs = torch.randn(batch, config.in_chans, size, size, generator=generator)
    mask = draw_masks(batch, config.token_size, config.mask_ratio, config.mask_regular, generator=generator,
                      rounding=model.contract.mask_rounding)
    sm = secondary_mask(mask, config.vis_mask_ratio, generator=generator) if config.vis_mask_ratio > 0 else None
    return imgs.to(device), mask.to(device), None if sm is None else sm.to(device)


def per_image_at(batch: int, at_two: float, at_four: float) -> float:
    """A quantity of one step that is affine in the batch (per-image work plus per-step work such as a
    relative position bias computed once), measured at 2 and 4 images: its share per image at ``batch``."""
    return (at_two + (at_four - at_two) * (batch - 2) / 2) / batch


def train_flops_per_image(model: torch.nn.Module, config: PretrainConfig) -> int:
    """Forward + backward FLOPs of one training image at --batch_size (engine.record.count_flops under
    the run's masks at 2 and 4 images, ``per_image_at``), on a copy of ``model`` on its device: the
    model, its gradients and every random generator of the run are left as they were."""
    import copy
    twin = copy.deepcopy(model).train()
    device = next(twin.parameters()).device
    gen = torch.Generator().manual_seed(FIGURE_SEED)

    def step_flops(batch: int) -> int:
        imgs, mask, sm = sample_batch(config, twin, batch, gen, device)
        return count_flops(lambda: twin(imgs, mask, sm).loss.backward())

    with rngs_untouched(device):
        two, four = step_flops(2), step_flops(4)
    return round(per_image_at(config.batch_size, two, four))
