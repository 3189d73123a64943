"""Semantic segmentation on the framework's backbones: ADE20K data, UperNet + FCN heads,
sliding-window / whole-image inference and confusion-matrix metrics (main_segmentation.py)."""
