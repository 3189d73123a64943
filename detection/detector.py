"""Detectors on dense backbones: the reference's GFL, and torchvision's Mask R-CNN.

Both take a padded, normalised batch and per-image sizes, and return a loss dict when
training and per-image detections when evaluating:

    det(images, image_sizes, targets) -> {"loss_...": scalar, ...}          (training)
    det(images, image_sizes)          -> [{"boxes", "scores", "labels"[, "masks"]}, ...]

images: (N, 3, H, W); image_sizes: [(h_i, w_i)] of the real content (top-left); targets[i]:
``boxes`` (G, 4) xyxy input pixels, ``labels`` (G,) in [0, num_classes), and for Mask R-CNN
``masks`` (G, h_i, w_i) uint8. Labels are contiguous class indices (no background index).
Masks come back as (M, 1, 28, 28) probabilities within their boxes (the mask head's output);
``detection.coco.paste_masks`` pastes them into an image of any size (the original one, in evaluation).
Boxes are float32 whatever the autocast precision.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder

from models.dense import DenseBackbone
from . import DETECTORS
from .gfl import GFLHead
from .neck import DenseNeck


class GFLDetector(nn.Module):
    """Backbone -> LN + Linear adapters (768) -> FPN 256 from stride 8, extra convs on output,
    5 levels (strides 8 ... 128) -> GFL head: the reference's detector."""

    def __init__(self, backbone: DenseBackbone, num_classes: int, adapter_dim: int = 768, fpn_dim: int = 256,
                 neck_norm: str = "bn", **head_kwargs) -> None:
        super().__init__()
        self.neck = DenseNeck(backbone, adapter_dim, fpn_dim, start_level=1, num_outs=5, extra="convs",
                              norm=neck_norm)
        self.head = GFLHead(num_classes, in_channels=fpn_dim, feat_channels=fpn_dim, strides=self.neck.strides,
                            **head_kwargs)
        self.num_classes = num_classes

    @property
    def backbone(self) -> DenseBackbone:
        return self.neck.backbone

    def forward(self, images: Tensor, image_sizes: Sequence[tuple[int, int]], targets: Optional[list] = None):
        cls, reg = self.head(list(self.neck(images).values()))
        if targets is not None:
            return self.head.loss(cls, reg, targets)
        return self.head.predict(cls, reg, image_sizes)


class _NoResizeTransform(nn.Module):
    """torchvision's GeneralizedRCNNTransform without its resize and normalisation: our data
    pipeline already resized and normalised every image; only the zero-padded batch is formed."""

    def __init__(self, size_divisor: int) -> None:
        super().__init__()
        self.size_divisor = size_divisor

    def forward(self, images, targets=None):
        from torchvision.models.detection.image_list import ImageList
        sizes = [tuple(img.shape[-2:]) for img in images]
        d = self.size_divisor
        h = -(-max(s[0] for s in sizes) // d) * d
        w = -(-max(s[1] for s in sizes) // d) * d
        batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
        for b, img in zip(batch, images):
            b[:, :img.shape[1], :img.shape[2]].copy_(img)
        return ImageList(batch, sizes), targets

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result  # masks stay in their boxes: evaluation pastes them at the original size


class Float32BoxCoder(BoxCoder):
    """torchvision's box coder computing in float32: its decode casts the proposals to the deltas'
    dtype, so under bf16 autocast every coordinate above 512 px became a multiple of 4 (of 8 above
    1024), in proposals, training targets and detections. GFL casts its regression to float as well."""

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return super().encode_single(reference_boxes.float(), proposals.float())

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        with torch.autocast(rel_codes.device.type, enabled=False):
            return super().decode_single(rel_codes.float(), boxes.float())


class MaskRCNNDetector(nn.Module):
    """torchvision's Mask R-CNN on the same backbone + adapters + FPN (all four backbone maps,
    P6 by max-pooling: torchvision's and ViTDet's / Swin's Mask R-CNN layout); torchvision's
    defaults: 2000 RPN proposals per image after NMS in training, 1000 in testing, 512 sampled
    RoIs, 100 detections. Boxes are encoded and decoded in float32 (``Float32BoxCoder``)."""

    def __init__(self, backbone: DenseBackbone, num_classes: int, adapter_dim: int = 768, fpn_dim: int = 256,
                 neck_norm: str = "bn", score_thr: float = 0.05, max_per_img: int = 100) -> None:
        super().__init__()
        from torchvision.models.detection import MaskRCNN
        neck = DenseNeck(backbone, adapter_dim, fpn_dim, start_level=0, num_outs=len(backbone.strides) + 1,
                         extra="maxpool", norm=neck_norm)
        self.model = MaskRCNN(neck, num_classes=num_classes + 1, box_score_thresh=score_thr,
                              box_detections_per_img=max_per_img)
        self.model.transform = _NoResizeTransform(backbone.size_divisor)
        for part in (self.model.rpn, self.model.roi_heads):
            part.box_coder = Float32BoxCoder(part.box_coder.weights, part.box_coder.bbox_xform_clip)
        self.num_classes = num_classes

    @property
    def backbone(self) -> DenseBackbone:
        return self.model.backbone.backbone

    def forward(self, images: Tensor, image_sizes: Sequence[tuple[int, int]], targets: Optional[list] = None):
        """Training (module in train mode) needs ``targets``; evaluation (eval mode) predicts."""
        crops = [img[:, :h, :w] for img, (h, w) in zip(images, image_sizes)]
        if targets is not None:  # torchvision counts the background as class 0
            targets = [{"boxes": t["boxes"].float(), "labels": t["labels"] + 1, "masks": t["masks"]} for t in targets]
        out = self.model(crops, targets)
        if not self.training:
            for r in out:
                r["labels"] = r["labels"] - 1
        return out




def build_detector(kind: str, backbone: DenseBackbone, num_classes: int, **kwargs) -> nn.Module:
    if kind == "gfl":
        return GFLDetector(backbone, num_classes, **kwargs)
    if kind == "mask_rcnn":
        return MaskRCNNDetector(backbone, num_classes, **kwargs)
    raise ValueError(f"detector {kind!r}: valid choices are {', '.join(DETECTORS)}")
