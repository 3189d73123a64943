"""Object detection on the framework's classifiers (main_detection.py): COCO data and evaluation,
the reference's GFL detector and torchvision's Mask R-CNN, LN + Linear adapters and an FPN. The
backbone is a classifier's feature pyramid (models.dense.DenseBackbone)."""
