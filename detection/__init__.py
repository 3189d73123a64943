"""Object detection on the framework's classifiers (main_detection.py): COCO data and evaluation,
the reference's GFL detector and torchvision's Mask R-CNN, LN + Linear adapters and an FPN. The
backbone is a classifier's feature pyramid (models.dense.DenseBackbone)."""

# the detectors --detector names (detection.detector builds them); here, so that the parser needs no torch
DETECTORS = ("gfl", "mask_rcnn")
