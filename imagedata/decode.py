"""Faster decoding for pretraining: ``--decode pil | fast | gpu``.

* ``pil`` (default): PIL decode (JPEG at a reduced DCT scale when ``ImageList.min_side`` allows)
  and torchvision's RandomResizedCrop + flip + ToTensor + Normalize.
* ``fast``: the same draws from the same generator (torchvision's own ``get_params`` on the image's
  size, then the flip), but simplejpeg decodes the JPEG (libjpeg-turbo; bit-identical to PIL's
  decode at full scale), at 1/2, 1/4 or 1/8 scale when the drawn crop stays >= twice the output size
  at that scale (``REDUCING_GAP``), and the crop is resized by torch's uint8 bicubic antialiased kernel (PIL's filter; at
  most one grey level from PIL's output) -- ``resized_crop``. Other formats, and JPEGs simplejpeg
  refuses (CMYK), are decoded by PIL and take the same crop path.
* ``gpu``: workers only read the bytes and draw the crop and flip (from the header's size, same
  draws); the main process decodes each batch with ``torchvision.io.decode_jpeg(device="cuda")``
  and crops, resizes (bicubic, antialiased, float, rounded to 0..255 as PIL does), flips and
  normalises on the device (``GpuDecodeLoader``). Non-JPEG files are decoded by PIL in the
  worker; a JPEG the GPU decoder refuses is decoded by PIL in the main process (counted, and
  reported per epoch); one that no decoder reads is named and replaced by another image of the
  batch (ok = 0), as in the other paths. A GPU decoder that reads none of a batch's JPEGs while
  PIL reads them is broken (driver, runtime, library): the first such batch warns with the cause,
  ``MAX_FAILED_BATCHES`` in a row raise.

GPU decoding runs on a side stream of its own. nvJPEG writes its outputs outside the order of the
stream it was called on, so outputs allocated from the training stream's memory pool could land in
blocks that queued backward / optimizer kernels still read. On the side stream the decoder's blocks
come from that stream's own pool, whose earlier work is finished (``synchronize``) before each
decode; the training stream waits for the finished batch (``wait_stream``) and the batch is
recorded as used there (``record_stream``), so nothing else is synchronised and decoding overlaps
the previous step's kernels.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop

from imagedata import DECODERS  # noqa: F401  (re-exported: the names use_decoder accepts)
from imagedata.images import IMAGENET_MEAN, IMAGENET_STD, PRETRAIN_SCALE, Encoded, to_rgb8

# A JPEG is decoded at a reduced DCT scale only while the crop keeps >= REDUCING_GAP x the output size, so
# that the antialiased bicubic still does part of the reduction (Pillow's advice for draft + resize).
REDUCING_GAP = 2
RATIO = (3 / 4, 4 / 3)
# A GPU decoder that reads no JPEG of this many batches in a row (while PIL reads them) stops the run.
MAX_FAILED_BATCHES = 3
# torchvision 0.29 deprecates its decoders in favour of torchcodec; decode_jpeg works (installed once here)
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)




def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def check_pixels(height: int, width: int, name: str) -> None:
    """Refuse what PIL refuses as a decompression bomb (more than twice ``Image.MAX_IMAGE_PIXELS``):
    simplejpeg has no such limit, and the fast and GPU paths must skip the files the PIL path skips."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and height * width > 2 * limit:
        raise Image.DecompressionBombError(
            f"{name}: {width}x{height} = {height * width:,} pixels, over the limit of {2 * limit:,} "
            f"(twice PIL's Image.MAX_IMAGE_PIXELS): a decompression bomb?")


def image_size(enc: Encoded) -> tuple[int, int]:
    """(height, width) from the header only (no pixel is decoded); a decompression bomb is refused."""
    if is_jpeg(enc.data):
        import simplejpeg
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(enc.data)
        except ValueError:
            pass
        else:
            check_pixels(h, w, enc.name)
            return h, w
    w, h = Image.open(io.BytesIO(enc.data)).size  # (PIL applies its own limit here)
    return h, w


def draw_crop(height: int, width: int, scale: Sequence[float] = PRETRAIN_SCALE,
              ratio: Sequence[float] = RATIO) -> tuple[tuple[int, int, int, int], bool]:
    """((top, left, h, w), flip): torchvision's RandomResizedCrop.get_params on an image of this size,
    then RandomHorizontalFlip's draw, from the global torch generator -- the draws of the PIL path."""
    box = RandomResizedCrop.get_params(torch.empty((3, height, width), device="meta"), list(scale), list(ratio))
    flip = bool(torch.rand(1) < 0.5)
    return box, flip


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 from a PIL image (any mode: high bit depths scaled as the PIL path does)."""
    return torch.from_numpy(np.array(to_rgb8(img))).permute(2, 0, 1)


def decode_cpu(enc: Encoded, box: Optional[tuple[int, int, int, int]] = None, size: int = 0) -> tuple[torch.Tensor, float, float]:
    """(3, H', W') uint8 and the scale (H'/H, W'/W). A JPEG is decoded by simplejpeg, at a reduced
    scale (factor >= 2) when ``box`` stays >= REDUCING_GAP * ``size`` on both sides; anything else by PIL."""
    if is_jpeg(enc.data):
        import simplejpeg
        try:
            kw = {}
            if box is not None and size:
                h, w, _, _ = simplejpeg.decode_jpeg_header(enc.data)
                _, _, bh, bw = box
                g = REDUCING_GAP * size
                if bh >= 2 * g and bw >= 2 * g:  # the crop stays >= REDUCING_GAP x the output after halving
                    kw = dict(min_height=math.ceil(h * g / bh), min_width=math.ceil(w * g / bw), min_factor=2)
                arr = simplejpeg.decode_jpeg(enc.data, colorspace="RGB", **kw)
                return torch.from_numpy(arr).permute(2, 0, 1), arr.shape[0] / h, arr.shape[1] / w
            arr = simplejpeg.decode_jpeg(enc.data, colorspace="RGB")
            return torch.from_numpy(arr).permute(2, 0, 1), 1.0, 1.0
        except ValueError:
            pass  # CMYK, or what libjpeg-turbo calls recoverable: PIL decides
    return pil_to_uint8(Image.open(io.BytesIO(enc.data))), 1.0, 1.0


def resized_crop(img: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool,
                 sy: float = 1.0, sx: float = 1.0, float_kernel: Optional[bool] = None) -> torch.Tensor:
    """img: (3, H, W) uint8 on any device -> (3, size, size) float in [0, 255] (whole numbers):
    the crop ``box`` (top, left, h, w; in the coordinates of an image ``1/sy`` x ``1/sx`` times as
    large), bicubic antialiased resize, optional horizontal flip. ``float_kernel`` (default: off
    the CPU) resizes in float32 and rounds, as on the GPU; the CPU test runs the GPU's code with it."""
    top, left, h, w = box
    if (sy, sx) != (1.0, 1.0):  # the box of the full-size image, on the reduced one
        t0, l0 = int(round(top * sy)), int(round(left * sx))
        top, left = t0, l0
        h = max(1, min(int(round(h * sy)), img.shape[1] - t0))
        w = max(1, min(int(round(w * sx)), img.shape[2] - l0))
    crop = img[:, top:top + h, left:left + w].unsqueeze(0)
    if not (img.device.type != "cpu" if float_kernel is None else float_kernel):
        # torch's uint8 kernel (channels-last): rounds and clamps as PIL; flip and lay out as (3, H, W)
        # while still uint8 (the float ops after it are then on contiguous memory)
        out = F.interpolate(crop.contiguous(memory_format=torch.channels_last), size=(size, size),
                            mode="bicubic", antialias=True)[0]
        return (out.flip(-1) if flip else out).contiguous().float()
    # float kernels only on the GPU: round and clamp to what a uint8 image would hold
    out = F.interpolate(crop.float(), size=(size, size), mode="bicubic", antialias=True,
                        align_corners=False).round_().clamp_(0, 255)[0]
    return out.flip(-1) if flip else out


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
_ON_DEVICE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x: (..., 3, H, W) in [0, 255] -> ToTensor + Normalize's values (the same operations, in order).
    Mean and std are copied to a device once (a copy from pageable memory waits for the stream)."""
    if x.device.type == "cpu":
        mean, std = _MEAN, _STD
    else:
        if x.device not in _ON_DEVICE:
            _ON_DEVICE[x.device] = (_MEAN.to(x.device), _STD.to(x.device))
        mean, std = _ON_DEVICE[x.device]
    return x.div_(255).sub_(mean).div_(std)


class FastPretrainTransform:
    """``--decode fast``: Encoded (or a PIL image) -> (3, size, size), the PIL path's draws."""

    torch_rng_only = True  # (imagedata.images.seeded_apply)

    def __init__(self, size: int, scale: Sequence[float] = PRETRAIN_SCALE) -> None:
        self.size, self.scale = size, tuple(scale)

    def __call__(self, item: Union[Encoded, Image.Image]) -> torch.Tensor:
        if isinstance(item, Image.Image):
            img, sy, sx = pil_to_uint8(item), 1.0, 1.0
            box, flip = draw_crop(img.shape[1], img.shape[2], self.scale)
        else:
            h, w = image_size(item)
            box, flip = draw_crop(h, w, self.scale)
            img, sy, sx = decode_cpu(item, box, self.size)
        return normalize(resized_crop(img, box, self.size, flip, sy, sx))


@dataclass
class Planned:
    """``--decode gpu``: what a worker sends for one image: the JPEG bytes (or, for another format,
    the PIL-decoded uint8 pixels), the drawn crop and flip."""
    data: Union[bytes, torch.Tensor]
    name: str
    box: tuple[int, int, int, int]
    flip: bool


class PlanTransform:
    """Worker side of ``--decode gpu``: Encoded -> Planned (reads the header, draws crop and flip)."""

    torch_rng_only = True  # (imagedata.images.seeded_apply)

    def __init__(self, size: int, scale: Sequence[float] = PRETRAIN_SCALE) -> None:
        self.size, self.scale = size, tuple(scale)

    def __call__(self, item: Union[Encoded, Image.Image]) -> Planned:
        if isinstance(item, Image.Image):
            img = pil_to_uint8(item)
            return Planned(img, "", *draw_crop(img.shape[1], img.shape[2], self.scale))
        data = item.data
        if is_jpeg(data):
            h, w = image_size(item)
        else:  # the GPU decodes JPEG only: PIL decodes the rest here
            img = pil_to_uint8(Image.open(io.BytesIO(data)))
            data, (h, w) = img, img.shape[1:]
        box, flip = draw_crop(h, w, self.scale)
        return Planned(data, item.name, box, flip)


def collate_planned(items: list) -> tuple[list, torch.Tensor, torch.Tensor]:
    """DataLoader collate for (Planned, label, ok) items: the Planned stay a list."""
    planned, labels, ok = zip(*items)
    return list(planned), torch.tensor(labels, dtype=torch.long), torch.tensor(ok, dtype=torch.long)


@dataclass
class DecodeStats:
    """What the batch decoder did over a loader's life, and the warnings it gave."""
    jpegs: int = 0                 # JPEGs handed to the decoder (device or CPU)
    pil_fallbacks: int = 0         # of those, refused by it and decoded by PIL in the main process
    failed_batches: int = 0        # batches in a row whose JPEGs the decoder read none of (PIL did)
    cause: str = ""                # the decoder's first error
    warned_down: bool = False      # the broken-decoder warning was given
    warned: set = field(default_factory=set)  # unreadable files already named


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _decode_jpegs(raw: list[torch.Tensor], device: torch.device) -> tuple[list[Optional[torch.Tensor]], str]:
    """Each JPEG decoded on ``device`` (None where the decoder refused it), and the batch call's error."""
    try:
        if device.type == "cuda":
            return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)), ""
        return [decode_jpeg(r, mode=ImageReadMode.RGB) for r in raw], ""
    except RuntimeError as e:  # one bad file fails the batch call: decode one by one
        error = f"{type(e).__name__}: {e}".strip()
    decoded: list[Optional[torch.Tensor]] = []
    for r in raw:
        try:
            decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded.append(None)
    return decoded, error


def decode_planned(planned: list[Planned], size: int, device: torch.device, stats: Optional[DecodeStats] = None,
                   float_kernel: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of Planned -> (N, 3, size, size) normalised on ``device``, and ok (N,) (0 where no
    decoder could read the image; it is replaced by another image of the batch). On a GPU the batch
    is made on the decoder's side stream and handed to the current stream (module doc)."""
    stats = stats if stats is not None else DecodeStats()
    if device.type != "cuda":
        return _decode_batch(planned, size, device, stats, float_kernel)
    side = _side_stream(device)
    side.synchronize()  # what the side stream did before (the last batch) is finished: its blocks are idle
    with torch.cuda.stream(side):
        imgs, ok = _decode_batch(planned, size, device, stats, float_kernel)
    current = torch.cuda.current_stream(device)
    current.wait_stream(side)
    imgs.record_stream(current)
    return imgs, ok


def _decode_batch(planned: list[Planned], size: int, device: torch.device, stats: DecodeStats,
                  float_kernel: Optional[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    jpeg_at = [i for i, p in enumerate(planned) if isinstance(p.data, bytes)]
    pixels: list[Optional[torch.Tensor]] = [None if isinstance(p.data, bytes) else p.data.to(device, non_blocking=True)
                                            for p in planned]
    if jpeg_at:
        raw = [torch.frombuffer(bytearray(planned[i].data), dtype=torch.uint8) for i in jpeg_at]
        decoded, error = _decode_jpegs(raw, device)
        stats.jpegs += len(raw)
        read_by_decoder = read_by_pil = 0
        for i, img in zip(jpeg_at, decoded):
            if img is not None and img.shape[0] == 1:
                img = img.expand(3, -1, -1)  # greyscale JPEG
            if img is not None and img.shape[0] == 3:
                read_by_decoder += 1
            else:
                try:  # CMYK and what the GPU decoder refuses: PIL
                    img = pil_to_uint8(Image.open(io.BytesIO(planned[i].data))).to(device)
                    read_by_pil += 1
                except Exception as e:
                    if planned[i].name not in stats.warned:
                        stats.warned.add(planned[i].name)
                        warnings.warn(f"skipping unreadable image {planned[i].name}: {type(e).__name__}: {e}")
                    img = None
            pixels[i] = img
        stats.pil_fallbacks += read_by_pil
        _check_decoder(stats, read_by_decoder, read_by_pil, error, device)
    good = [i for i, p in enumerate(pixels) if p is not None]
    if not good:
        raise ValueError(f"no image of a batch could be decoded (first: {planned[0].name})")
    out = []
    ok = torch.ones(len(planned), dtype=torch.long)
    for i, p in enumerate(planned):
        if pixels[i] is None:
            ok[i] = 0
            out.append(out[-1] if out else None)
            continue
        out.append(resized_crop(pixels[i], p.box, size, p.flip, float_kernel=float_kernel))
    first = next(x for x in out if x is not None)
    out = [first if x is None else x for x in out]
    return normalize(torch.stack(out)), ok


def _check_decoder(stats: DecodeStats, read_by_decoder: int, read_by_pil: int, error: str,
                   device: torch.device) -> None:
    """A batch whose JPEGs PIL read and the decoder none: warn the first time, raise after
    MAX_FAILED_BATCHES in a row (a broken decoder would otherwise leave the run on PIL in one process)."""
    if read_by_decoder or not read_by_pil:
        stats.failed_batches = 0
        return
    stats.failed_batches += 1
    stats.cause = stats.cause or error or "every image refused"
    where = f"the {'GPU' if device.type == 'cuda' else 'CPU'} JPEG decoder (torchvision {_torchvision_build()})"
    if stats.failed_batches >= MAX_FAILED_BATCHES:
        raise RuntimeError(f"{where} read no JPEG of {stats.failed_batches} batches in a row that PIL reads "
                           f"({stats.cause}); fix the CUDA / nvJPEG set-up or use --decode fast")
    if not stats.warned_down:
        stats.warned_down = True
        warnings.warn(f"{where} read none of a batch's JPEGs ({stats.cause}); PIL decodes them in the main "
                      f"process, which is slow; {MAX_FAILED_BATCHES} such batches in a row stop the run")


def _torchvision_build() -> str:
    import torchvision
    return f"{torchvision.__version__}, torch {torch.__version__} for CUDA {torch.version.cuda}"


class GpuDecodeLoader:
    """Wraps a DataLoader whose batches are (list of Planned, labels, ok): yields (images on
    ``device``, labels, ok) as the other paths do. Decoding runs in the main process, inside the
    time the loop waits for a batch (counted as data wait); JPEGs the GPU decoder refused and PIL
    decoded in the main process are reported at the end of each epoch (``stats``)."""

    def __init__(self, loader, size: int, device: torch.device) -> None:
        self.loader, self.size, self.device = loader, size, device
        self.sampler = getattr(loader, "sampler", None)
        self.dataset = getattr(loader, "dataset", None)
        self.stats = DecodeStats()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        jpegs, fallbacks = self.stats.jpegs, self.stats.pil_fallbacks
        for planned, labels, ok in self.loader:
            imgs, decoded_ok = decode_planned(planned, self.size, self.device, self.stats)
            yield imgs, labels, ok * decoded_ok
        n = self.stats.pil_fallbacks - fallbacks
        if n:
            warnings.warn(f"--decode gpu: {n} of {self.stats.jpegs - jpegs} JPEGs this epoch were refused by the "
                          f"GPU decoder and decoded by PIL in the main process")


def use_decoder(dataset, decode: str, size: int):
    """Switch a pretraining data set (``SeededImageDataset`` or ``ShardStream``) to ``decode``;
    returns the DataLoader ``collate_fn`` it needs (None: the default)."""
    if decode == "pil":
        return None
    dataset.transform = FastPretrainTransform(size) if decode == "fast" else PlanTransform(size)
    if hasattr(dataset, "raw"):  # a ShardStream (collates its batches itself)
        dataset.raw = True
        return None
    dataset.images.raw = True
    return collate_planned if decode == "gpu" else None
