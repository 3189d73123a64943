"""One pretraining epoch: masks drawn on the device, the shared step loop does the rest."""
from __future__ import annotations

from typing import Optional

import torch

from models.masking import draw_masks, secondary_mask
from engine.distributed import get_rank, get_world_size
from engine.step import train_one_epoch


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


def pretrain_one_epoch(model, loader, optimizer, scaler, device, epoch, args, masks: MaskSampler,
                       log_writer=None, stop_flag=None, start_step: int = 0) -> dict:
    def compute_loss(batch):
        imgs, _, ok = batch
        imgs = imgs.to(device, non_blocking=True)
        if args.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        mask, sm = masks(imgs.shape[0])
        loss, _, _ = model(imgs, mask, sm) if sm is not None else model(imgs, mask)
        return loss, imgs.shape[0], {"skipped_images": int((ok == 0).sum())}

    return train_one_epoch(model, loader, optimizer, scaler, device, epoch, args, compute_loss,
                           log_writer=log_writer, header=f"Epoch [{epoch}]", stop_flag=stop_flag,
                           start_step=start_step)
