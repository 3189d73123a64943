"""Dense prediction (detection, segmentation) on the framework's classifiers.

``detection.backbone``: any Swin / PVT / ViT classifier (or a pretraining / finetuning checkpoint
of one) as a backbone ``images -> list of NCHW maps`` with ``out_channels`` and ``strides``.
"""
