"""Generalized Focal Loss detector head (Li et al., NeurIPS 2020), as the reference's mmdet config
uses it: ATSS assignment (top 9 per level), Quality Focal Loss (beta 2), Distribution Focal Loss
(weight 0.25, reg_max 16), GIoU loss (weight 2.0), 4 stacked convs with GroupNorm, one square
anchor of 8 x stride per location (strides 8 ... 128). Plain PyTorch on torchvision ops.

Boxes are (x1, y1, x2, y2) in input pixels. Anchors are centred on ``(x * stride, y * stride)``
(mmdet 2.x's anchor generator, centre offset 0).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, generalized_box_iou_loss

from util.distributed import get_world_size, is_dist


def quality_focal_loss(logits: Tensor, labels: Tensor, scores: Tensor, beta: float = 2.0) -> Tensor:
    """QFL per anchor, summed over classes.

    logits: (A, C); labels: (A,) in [0, C] (C = background); scores: (A,) the IoU target of
    positives. Negatives: BCE(sigma, 0) * sigma**beta on every class; a positive's own class:
    BCE(sigma, score) * |score - sigma|**beta. Returns (A,).
    """
    num_classes = logits.shape[1]
    p = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * p.pow(beta)
    pos = (labels < num_classes).nonzero().squeeze(1)
    if pos.numel():
        cls = labels[pos]
        s = scores[pos].to(logits.dtype)
        lp = logits[pos, cls]
        pos_loss = F.binary_cross_entropy_with_logits(lp, s, reduction="none") * (s - lp.sigmoid()).abs().pow(beta)
        loss = loss.index_put((pos, cls), pos_loss)
    return loss.sum(dim=1)


def distribution_focal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """DFL: cross-entropy towards the two bins around a continuous target.

    pred: (K, reg_max + 1) logits; target: (K,) in [0, reg_max). Returns (K,).
    """
    left = target.long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    return F.cross_entropy(pred, left, reduction="none") * w_left + F.cross_entropy(pred, right, reduction="none") * w_right


def anchor_centers(size: tuple[int, int], stride: int, device: torch.device) -> Tensor:
    """(h * w, 2) anchor centres (x, y) of an h x w map, row-major."""
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) * stride,
                            torch.arange(w, device=device, dtype=torch.float32) * stride, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def distance2bbox(points: Tensor, distance: Tensor, max_shape: Optional[tuple[int, int]] = None) -> Tensor:
    """points (K, 2) + (left, top, right, bottom) distances (K, 4) -> boxes (K, 4), clipped to (h, w)."""
    x1 = points[:, 0] - distance[:, 0]
    y1 = points[:, 1] - distance[:, 1]
    x2 = points[:, 0] + distance[:, 2]
    y2 = points[:, 1] + distance[:, 3]
    if max_shape is not None:
        x1, x2 = x1.clamp(0, max_shape[1]), x2.clamp(0, max_shape[1])
        y1, y2 = y1.clamp(0, max_shape[0]), y2.clamp(0, max_shape[0])
    return torch.stack([x1, y1, x2, y2], dim=-1)


def bbox2distance(points: Tensor, boxes: Tensor, max_dis: float) -> Tensor:
    """Inverse of distance2bbox, clamped to [0, max_dis]: (K, 4)."""
    d = torch.stack([points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1],
                     boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]], dim=-1)
    return d.clamp(min=0, max=max_dis)


@torch.no_grad()
def atss_assign(anchors: Tensor, level_sizes: Sequence[int], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """Adaptive Training Sample Selection (Zhang et al., CVPR 2020).

    anchors: (A, 4) of all levels, concatenated; level_sizes: anchors per level;
    gt_boxes: (G, 4). For every gt, the ``topk`` anchors per level nearest to its centre are
    candidates; those whose IoU reaches mean + std of the candidates' IoUs (unbiased std) and
    whose centre lies inside the gt are positive; an anchor positive for several gts takes
    the one of highest IoU. Returns (A,) the assigned gt index, -1 for negatives.
    """
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    assigned = anchors.new_full((num_anchors,), -1, dtype=torch.long)
    if num_gt == 0 or num_anchors == 0:
        return assigned
    overlaps = box_iou(anchors, gt_boxes)                                   # (A, G)
    gt_c = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    an_c = (anchors[:, :2] + anchors[:, 2:]) / 2
    dist = torch.cdist(an_c, gt_c)                                          # (A, G)
    candidates, start = [], 0
    for n in level_sizes:
        k = min(topk, n)
        _, idx = dist[start:start + n].topk(k, dim=0, largest=False)
        candidates.append(idx + start)
        start += n
    cand = torch.cat(candidates, dim=0)                                     # (K, G)
    gidx = torch.arange(num_gt, device=anchors.device)
    cand_iou = overlaps[cand, gidx]
    thr = cand_iou.mean(0) + cand_iou.std(0)
    is_pos = cand_iou >= thr
    cx, cy = an_c[cand, 0], an_c[cand, 1]
    inside = torch.stack([cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy],
                         dim=-1).amin(-1) > 0.01
    is_pos &= inside
    masked = torch.full_like(overlaps, -math.inf)
    rows, cols = cand[is_pos], gidx.expand_as(cand)[is_pos]
    masked[rows, cols] = overlaps[rows, cols]
    best, arg = masked.max(dim=1)
    assigned[best > -math.inf] = arg[best > -math.inf]
    return assigned


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm without its refusal of a group that holds one value (one image, one channel
    per group, a 1x1 map: the coarsest level of a test image of 128 px or less when the head is
    32 channels wide). Such a value normalises to 0, so the output is the bias, as the formula says."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class Scale(nn.Module):
    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class GFLHead(nn.Module):
    """Shared over levels: 4 x (conv3x3 + GN(32) + ReLU) towers for classification and regression,
    then conv3x3 -> class logits and conv3x3 -> 4 x (reg_max + 1) distance-bin logits per anchor.

    feats: list of (N, C, H_l, W_l) -> (cls: list of (N, num_classes, H_l, W_l),
    reg: list of (N, 4 * (reg_max + 1), H_l, W_l)).
    """

    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 256, stacked_convs: int = 4,
                 strides: Sequence[int] = (8, 16, 32, 64, 128), reg_max: int = 16, octave_base_scale: float = 8.0,
                 topk: int = 9, beta: float = 2.0, loss_bbox_weight: float = 2.0, loss_dfl_weight: float = 0.25,
                 score_thr: float = 0.05, nms_iou: float = 0.6, nms_pre: int = 1000, max_per_img: int = 100) -> None:
        super().__init__()
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, list(strides)
        self.octave_base_scale, self.topk, self.beta = octave_base_scale, topk, beta
        self.loss_bbox_weight, self.loss_dfl_weight = loss_bbox_weight, loss_dfl_weight
        self.score_thr, self.nms_iou, self.nms_pre, self.max_per_img = score_thr, nms_iou, nms_pre, max_per_img

        def tower():
            layers, c = [], in_channels
            for _ in range(stacked_convs):
                layers += [nn.Conv2d(c, feat_channels, 3, padding=1, bias=False),
                           GroupNorm(32 if feat_channels % 32 == 0 else 1, feat_channels), nn.ReLU(inplace=True)]
                c = feat_channels
            return nn.Sequential(*layers)

        self.cls_convs, self.reg_convs = tower(), tower()
        self.gfl_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(feat_channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if len(feats) != len(self.strides):
            raise ValueError(f"GFL head has {len(self.strides)} levels, got {len(feats)} maps")
        cls, reg = [], []
        for x, scale in zip(feats, self.scales):
            cls.append(self.gfl_cls(self.cls_convs(x)))
            reg.append(scale(self.gfl_reg(self.reg_convs(x))).float())
        return cls, reg

    def integral(self, reg: Tensor) -> Tensor:
        """(K, 4 * (reg_max + 1)) bin logits -> (K, 4) expected distances in stride units."""
        p = F.softmax(reg.reshape(-1, self.reg_max + 1), dim=1)
        return (p @ self.project.to(p.dtype)).reshape(-1, 4)

    def _flatten(self, cls: list[Tensor], reg: list[Tensor]):
        """Per-level maps -> (N, A, C), (N, A, 4(R+1)) and the anchors' centres / strides / boxes."""
        n = cls[0].shape[0]
        device = cls[0].device
        centers, strides, sizes = [], [], []
        for x, s in zip(cls, self.strides):
            c = anchor_centers(tuple(x.shape[-2:]), s, device)
            centers.append(c)
            strides.append(torch.full((len(c),), float(s), device=device))
            sizes.append(len(c))
        centers, strides = torch.cat(centers), torch.cat(strides)
        half = (self.octave_base_scale * strides / 2).unsqueeze(1)
        anchors = torch.cat([centers - half, centers + half], dim=1)
        cls_flat = torch.cat([x.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes) for x in cls], dim=1)
        reg_flat = torch.cat([x.permute(0, 2, 3, 1).reshape(n, -1, 4 * (self.reg_max + 1)) for x in reg], dim=1)
        return cls_flat, reg_flat, centers, strides, anchors, sizes

    def loss(self, cls: list[Tensor], reg: list[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        """targets[i]: ``boxes`` (G_i, 4) float, ``labels`` (G_i,) long in [0, num_classes).

        As mmdet's GFLHead: QFL summed / number of positives; GIoU and DFL weighted by the
        positive's top predicted score (detached) and divided by the sum of those weights
        (DFL also by 4); both counts averaged over ranks.
        """
        cls_flat, reg_flat, centers, strides, anchors, sizes = self._flatten(cls, reg)
        n, a = cls_flat.shape[:2]
        labels = torch.full((n, a), self.num_classes, dtype=torch.long, device=cls_flat.device)
        gt_for = torch.zeros(n, a, 4, device=cls_flat.device)
        for i, t in enumerate(targets):
            g = atss_assign(anchors, sizes, t["boxes"].float(), self.topk)
            pos = g >= 0
            labels[i, pos] = t["labels"][g[pos]]
            gt_for[i, pos] = t["boxes"].float()[g[pos]]
        labels, gt_for = labels.reshape(-1), gt_for.reshape(-1, 4)
        cls_all = cls_flat.reshape(-1, self.num_classes).float()
        reg_all = reg_flat.reshape(-1, 4 * (self.reg_max + 1))
        cen = centers.repeat(n, 1)
        st = strides.repeat(n)
        pos = (labels < self.num_classes).nonzero().squeeze(1)
        score = torch.zeros(len(labels), device=cls_all.device)
        num_pos = torch.tensor(float(len(pos)), device=cls_all.device)
        if len(pos):
            s = st[pos].unsqueeze(1)
            pc = cen[pos] / s
            pred_d = self.integral(reg_all[pos])
            pred_box = distance2bbox(pc, pred_d)
            gt_box = gt_for[pos] / s
            with torch.no_grad():
                score[pos] = box_iou_aligned(pred_box.detach(), gt_box).clamp(min=0)
                weight = cls_all[pos].detach().sigmoid().max(dim=1).values
            loss_bbox = (generalized_box_iou_loss(pred_box, gt_box, reduction="none") * weight).sum()
            target_d = bbox2distance(pc, gt_box, self.reg_max - 0.01).reshape(-1)
            loss_dfl = (distribution_focal_loss(reg_all[pos].reshape(-1, self.reg_max + 1), target_d)
                        * weight.repeat_interleave(4)).sum() / 4.0
            weight_sum = weight.sum()
        else:
            loss_bbox = loss_dfl = reg_all.sum() * 0
            weight_sum = torch.zeros((), device=cls_all.device)
        loss_cls = quality_focal_loss(cls_all, labels, score, self.beta).sum()
        num_pos = _mean_over_ranks(num_pos).clamp(min=1.0)
        weight_sum = _mean_over_ranks(weight_sum.detach()).clamp(min=1.0)
        return {"loss_cls": loss_cls / num_pos, "loss_bbox": self.loss_bbox_weight * loss_bbox / weight_sum,
                "loss_dfl": self.loss_dfl_weight * loss_dfl / weight_sum}

    @torch.no_grad()
    def predict(self, cls: list[Tensor], reg: list[Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[dict]:
        """Per image: top ``nms_pre`` anchors per level by best class score, scores above
        ``score_thr``, class-wise NMS at ``nms_iou``, best ``max_per_img``. Boxes in input pixels,
        clipped to the image's (h, w)."""
        out = []
        for i, size in enumerate(image_sizes):
            boxes, scores, labels = [], [], []
            for c, r, s in zip(cls, reg, self.strides):
                p = c[i].permute(1, 2, 0).reshape(-1, self.num_classes).float().sigmoid()
                d = r[i].permute(1, 2, 0).reshape(-1, 4 * (self.reg_max + 1))
                cen = anchor_centers(tuple(c.shape[-2:]), s, c.device)
                if self.nms_pre > 0 and len(p) > self.nms_pre:
                    keep = p.max(dim=1).values.topk(self.nms_pre).indices
                    p, d, cen = p[keep], d[keep], cen[keep]
                b = distance2bbox(cen, self.integral(d) * s, max_shape=size)
                a_idx, c_idx = (p > self.score_thr).nonzero(as_tuple=True)
                boxes.append(b[a_idx])
                scores.append(p[a_idx, c_idx])
                labels.append(c_idx)
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            keep = batched_nms(boxes, scores, labels, self.nms_iou)[: self.max_per_img]
            out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return out


def box_iou_aligned(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of a[i] with b[i]: (K, 4), (K, 4) -> (K,)."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)
    return inter / (area(a) + area(b) - inter).clamp(min=eps)


def _mean_over_ranks(t: Tensor) -> Tensor:
    if is_dist() and get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
        t = t / get_world_size()
    return t
