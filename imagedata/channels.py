"""Images of any number of channels at their full precision: ``--in_chans N``.

With 3 channels the programs keep the reference's path: 8-bit RGB through PIL, torchvision's and
timm's augmentations (``imagedata.datasets``). Any other channel count reads each file as an array
(``read_array``) and keeps its precision into the first layer:

* PNG / JPEG / other PIL formats: grey (8 or 16 bit), grey + alpha, RGB(A), 32-bit float;
* TIFF through tifffile: any number of bands, planar or interleaved, any dtype;
* ``.npy``: (H, W) or (H, W, C), read with ``allow_pickle=False`` (an object array is refused).

8- and 16-bit integers are scaled to [0, 1] by their range (no 8-bit round trip); 32-bit integers
and floats are kept as they are (the per-channel statistics, ``--norm_stats auto``, put the bands
on a common scale). The augmentations are the geometric ones (random resized crop, flip; resize and
centre crop for evaluation; random erasing) on (C, H, W) float tensors; colour operations
(RandAugment, colour jitter) are defined for RGB only and refused by name.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from errors import DataError, UsageError
from imagedata.images import IMAGENET_MEAN, IMAGENET_STD, PRETRAIN_SCALE

NPY_MAGIC = b"\x93NUMPY"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# PIL modes whose channels the RGB path reads too (converted to RGB): what --in_chans 3 accepts
RGB_CONVERTIBLE = (1, 2, 3, 4)


@dataclass(frozen=True)
class Pixels:
    """What a model's input pixels are: ``in_chans`` channels, normalised by per-channel ``mean`` / ``std``
    (of values scaled as ``to_tensor`` scales them). The default is the reference's RGB + ImageNet."""
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def arrays(self) -> bool:
        """Read as arrays at full precision (any channel count but 3: module doc)."""
        return self.in_chans != 3


RGB = Pixels()


class ChannelMismatch(DataError):
    """An image has another number of channels than the model takes: an error of the data set, not a
    sample to skip."""


def is_npy(data: bytes) -> bool:
    return data[:6] == NPY_MAGIC


def is_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_MAGICS


def _tiff_array(data: bytes, name: str) -> np.ndarray:
    """The first series of a TIFF as (H, W, C): Y and X first, every other axis (samples, channels,
    planes) folded into C in its stored order."""
    import tifffile
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        arr, axes = series.asarray(), series.axes
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{name}: a TIFF whose first series has axes {axes!r} (no Y and X image axes)")
    order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes) if a not in "YX"]
    arr = arr.transpose(order)
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def _pil_array(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)  # (byte order resolved by the copy)
    elif mode == "I" and img.format == "PNG":  # a 16-bit PNG as some Pillow versions open it
        return np.asarray(img).astype(np.uint16)
    return np.asarray(img)


def read_array(data: bytes, name: str) -> np.ndarray:
    """An image file's bytes -> (H, W, C) array in the file's own dtype (by content, not by name)."""
    if is_npy(data):
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:  # an object array would need pickle: never executed here
            raise DataError(f"{name}: {e}") from None
        if arr.ndim not in (2, 3) or not arr.dtype.kind in "biuf":
            raise DataError(f"{name}: a .npy image is (H, W) or (H, W, C) of numbers, got {arr.dtype} {arr.shape}")
    elif is_tiff(data):
        arr = _tiff_array(data, name)
    else:
        arr = _pil_array(data)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return arr


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, C) array -> (C, H, W) float32: uint8 / 255, uint16 / 65535, anything else as it is."""
    if arr.dtype == np.uint8:
        scaled = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        scaled = arr.astype(np.float32) / 65535.0
    else:
        scaled = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


def mismatch(name: str, found: int, in_chans: int) -> ChannelMismatch:
    return ChannelMismatch(f"{name} has {found} channel{'s' if found != 1 else ''}, but the model takes "
                           f"--in_chans {in_chans}: pass --in_chans {found} or convert the data")


def load_pixels(data: bytes, name: str, in_chans: int) -> torch.Tensor:
    """An image file's bytes -> (in_chans, H, W) float32 at full precision; another channel count is
    a ChannelMismatch naming the file and both counts."""
    arr = read_array(data, name)
    if arr.shape[2] != in_chans:
        raise mismatch(name, arr.shape[2], in_chans)
    return to_tensor(arr)


def check_channels(images, in_chans: int) -> None:
    """Read the data set's first image and check its channels against ``in_chans`` (with 3, what the
    RGB path converts: grey, grey + alpha, RGB, RGBA); raises ChannelMismatch naming the file."""
    if not len(images):
        return
    data, name = images.raw_bytes(0)
    try:
        found = read_array(data, name).shape[2]
    except ChannelMismatch:
        raise
    except Exception:
        return  # an unreadable first file is the skipping machinery's to name
    if found != in_chans and not (in_chans == 3 and found in RGB_CONVERTIBLE):
        raise mismatch(name, found, in_chans)


def check_colour_ops(in_chans: int, aa: Optional[str], color_jitter: Optional[float]) -> None:
    """Colour operations are defined for RGB only: refused by name for another channel count."""
    if in_chans == 3:
        return
    if aa:
        raise UsageError(f"--aa {aa} (RandAugment) works on RGB images only: with --in_chans {in_chans} pass --aa none")
    if color_jitter:
        raise UsageError(f"--color_jitter works on RGB images only: with --in_chans {in_chans} drop it")


def _mark(tf: Callable) -> Callable:
    tf.torch_rng_only = True  # torchvision's crops and flips draw from torch alone (imagedata.images.seeded_apply)
    return tf


def pretrain_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """(C, H, W) float -> (C, size, size): the pretraining crop and flip, then the statistics."""
    return _mark(transforms.Compose([
        transforms.RandomResizedCrop(size, scale=PRETRAIN_SCALE, interpolation=InterpolationMode.BICUBIC,
                                     antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.Normalize(mean, std),
    ]))


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """The evaluation resize and centre crop (crop_pct as the RGB path), then the statistics."""
    crop_pct = 224 / 256 if size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(size / crop_pct), interpolation=InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(size),
        transforms.Normalize(mean, std),
    ])


def finetune_transform(size: int, min_crop_scale: float, reprob: float, remode: str, recount: int,
                       mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Finetuning on N channels: random resized crop, flip, the statistics, timm's random erasing."""
    from timm.data.random_erasing import RandomErasing
    steps = [transforms.RandomResizedCrop(size, scale=(min_crop_scale, 1.0), interpolation=InterpolationMode.BICUBIC,
                                          antialias=True),
             transforms.RandomHorizontalFlip(),
             transforms.Normalize(mean, std)]
    if reprob > 0:
        steps.append(RandomErasing(reprob, mode=remode, max_count=recount, device="cpu"))
    return transforms.Compose(steps)
