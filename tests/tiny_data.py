"""Tiny image data sets the tests build: unlabelled photos of smooth noise, and three colour classes."""
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(200, 40, 40), (40, 160, 60), (40, 60, 200)]

def make_images(folder: Path, n: int = 8, size: int = 96, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # smooth random images: something a tiny model can learn to reconstruct
        base = rng.random((6, 6, 3))
        img = Image.fromarray((base * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        img.save(folder / f"img_{i:03d}.png")
    return folder


def make_labelled(root: Path, per_class: int = 6, size: int = 72) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for c, colour in enumerate(COLOURS):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root
