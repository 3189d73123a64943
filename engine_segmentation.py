"""Segmentation training chunk (the shared step loop) and evaluation (confusion matrix over the set)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from segmentation.inference import predict
from segmentation.metrics import confusion_matrix, segmentation_metrics
from util.distributed import is_dist
from util.loop import autocast, train_one_epoch


def train_chunk(model, loader, optimizer, scaler, device, chunk: int, args, log_writer=None, stop_flag=None,
                start_step: int = 0) -> dict:
    """``args.eval_interval`` iterations (one "epoch" of the step loop); the model's forward with
    labels returns (loss, parts)."""
    def compute_loss(batch):
        imgs, labels, ok = batch
        loss, _ = model(imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        return loss, imgs.shape[0], {"skipped_images": int((ok == 0).sum())}

    first = chunk * args.eval_interval
    header = f"Iter [{first}-{min(first + args.eval_interval, args.iters)}]"
    return train_one_epoch(model, loader, optimizer, scaler, device, chunk, args, compute_loss,
                           log_writer=log_writer, header=header, stop_flag=stop_flag, start_step=start_step)


@torch.no_grad()
def evaluate(model, loader, device, num_classes: int, class_names, mode: str = "slide", crop: int = 512,
             stride: int = 341, amp: str = "none", sharded: bool = False) -> dict:
    """mIoU / mAcc / aAcc / per-class IoU over the loader (batch 1: images keep their sizes).
    Predictions are made at the test scale and resized to the original labels; confusion matrices
    of sharded ranks are summed (each image counted once)."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    counts = torch.zeros(2, dtype=torch.long, device=device)  # evaluated, unreadable
    for img, label, ok in loader:
        if not int(ok[0]):
            counts[1] += 1
            continue
        with autocast(amp, device):
            pred = predict(model, img.to(device, non_blocking=True), num_classes, mode, crop, stride,
                           out_size=label.shape[-2:])
        cm += confusion_matrix(pred[0], label[0].to(device), num_classes)
        counts[0] += 1
    if sharded and is_dist():
        dist.all_reduce(cm)
        dist.all_reduce(counts)
    out = segmentation_metrics(cm, class_names)
    out.update(mode=mode, images=int(counts[0]), unreadable=int(counts[1]))
    if mode == "slide":
        out.update(crop=crop, stride=stride)
    return out
