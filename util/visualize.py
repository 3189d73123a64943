"""Reconstruction figures: original | what the encoder saw | reconstruction | reconstruction + visible.

With norm-pix targets the model predicts each unit's pixels normalised by that
unit's own mean and std, which the model never sees for a masked unit. Two ways
to show them:
  * ``denorm="neighbour"`` (default, honest): each masked unit takes the mean/std
    of the nearest unit the encoder actually saw (for uniform masks, the visible
    unit of its own 2x2 group when it was not secondary-masked);
  * ``denorm="true"``: each unit's true mean/std, as the reference notebook does;
    this leaks the hidden statistics and flatters the picture.
The figure states which one was used.

Images of another channel count than 3 (``--in_chans``) are shown de-normalised with the run's
statistics: one channel in grey, more as the three bands ``bands`` names (default the first three),
each stretched linearly between the 1st and 99th percentile of the originals' values (one scale for
every panel of the figure, so that the reconstruction is shown as the original is).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from models.loss import patchify, unit_stats, unpatchify
from imagedata.channels import RGB, Pixels


def _denormalise(imgs: Tensor, pixels: Pixels) -> Tensor:
    c = imgs.shape[1]
    mean = torch.tensor(pixels.mean, dtype=imgs.dtype, device=imgs.device).view(1, c, 1, 1)
    std = torch.tensor(pixels.std, dtype=imgs.dtype, device=imgs.device).view(1, c, 1, 1)
    return imgs * std + mean


def display_bands(in_chans: int, bands: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """The channels a figure shows: one (grey) or three (as R, G, B); checked against ``in_chans``."""
    if bands is None:
        return (0,) if in_chans < 3 else (0, 1, 2)
    bands = tuple(int(b) for b in bands)
    if len(bands) not in (1, 3) or not all(0 <= b < in_chans for b in bands):
        raise ValueError(f"--vis_bands {' '.join(map(str, bands))}: give 1 or 3 channel indices in 0..{in_chans - 1}")
    return bands


def display_scale(original: Tensor, pixels: Pixels, bands: Sequence[int]) -> Optional[tuple[Tensor, Tensor]]:
    """(low, high) per shown band, (1, B, 1, 1): the originals' 1st and 99th percentiles (None: 8-bit RGB,
    shown as 0..1)."""
    if pixels.in_chans == 3 and tuple(bands) == (0, 1, 2):  # 8-bit RGB: shown as it is
        return None
    x = _denormalise(original.float(), pixels)[:, list(bands)].transpose(0, 1).reshape(len(bands), -1)
    q = torch.quantile(x, torch.tensor([0.01, 0.99], device=x.device), dim=1)   # (2, B)
    low, high = q[0], torch.maximum(q[1], q[0] + 1e-6)
    return low.view(1, -1, 1, 1), high.view(1, -1, 1, 1)


def _to_uint8(imgs: Tensor, pixels: Pixels = RGB, bands: Sequence[int] = (0, 1, 2),
              scale: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """(N, C, H, W) normalised -> (N, 3, H, W) uint8 for display (grey repeated for one band)."""
    x = _denormalise(imgs, pixels)[:, list(bands)]
    if scale is not None:
        low, high = (t.to(x.dtype) for t in scale)
        x = (x - low) / (high - low)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _nearest_seen(seen: Tensor, grid: int) -> Tensor:
    """For every unit, the index of the nearest seen unit: seen (N, L) bool -> (N, L) int64."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1)
    coords = coords.reshape(-1, 2).float().to(seen.device)
    dist = torch.cdist(coords, coords)                        # (L, L)
    dist = dist.unsqueeze(0).expand(seen.shape[0], -1, -1).masked_fill(~seen.unsqueeze(1), float("inf"))
    return dist.argmin(dim=-1)


@torch.no_grad()
def reconstruct(model, imgs: Tensor, mask: Tensor, sm_mask: Optional[Tensor] = None,
                denorm: str = "neighbour") -> dict[str, Tensor]:
    """Run a pretraining model and return the four panels as (N, C, H, W) normalised images."""
    if denorm not in ("neighbour", "true"):
        raise ValueError(f"denorm must be 'neighbour' or 'true', got {denorm!r}")
    contract = model.contract
    unit = contract.stride
    mask = mask.bool()
    sm = sm_mask.bool() if sm_mask is not None else torch.zeros_like(mask)
    out = model(imgs, mask, sm_mask)
    mask = out.mask.bool()  # the mask the model actually used (MixMAE pairs its samples' masks)
    pred = out.pred.float()
    target = patchify(imgs.float(), unit)
    if contract.norm_pix_loss:
        # Targets are normalised per ``norm_pix_unit`` patch: the mask unit, or a part of it (Hiera: 16 px of 32).
        part = contract.norm_pix_unit
        f = unit // part
        fine = patchify(unpatchify(pred, unit, imgs.shape[1]), part)
        mean, std = unit_stats(patchify(imgs.float(), part))
        if denorm == "neighbour":
            n, t = mask.shape[0], contract.token_size
            seen = (~mask & ~sm).view(n, t, 1, t, 1).expand(n, t, f, t, f).reshape(n, -1)
            src = _nearest_seen(seen, t * f)
            mean = mean.gather(1, src.unsqueeze(-1))
            std = std.gather(1, src.unsqueeze(-1))
        pred = patchify(unpatchify(fine * std + mean, part, imgs.shape[1]), unit)
    grid = contract.token_size
    hidden = (mask | sm).unsqueeze(-1)
    saw = torch.where(hidden, torch.zeros_like(target), target)
    pasted = torch.where(hidden, pred, target)
    c = imgs.shape[1]
    panels = {"original": imgs.float(), "seen": unpatchify(saw, unit, c), "reconstruction": unpatchify(pred, unit, c),
              "reconstruction + visible": unpatchify(pasted, unit, c)}
    panels["_mask"] = mask.view(-1, grid, grid)
    panels["_sm"] = sm.view(-1, grid, grid)
    return panels


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """Split ``text`` into lines no wider than ``width`` pixels (a single long word gets its own line)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def save_figure(panels: dict[str, Tensor], path: str | Path, caption: str, unit: int, pixels: Pixels = RGB,
                bands: Optional[Sequence[int]] = None) -> Path:
    """Write the panels as a PNG grid (one row per image); secondary-masked units are outlined.
    Panel names wrap to their column and the caption to the figure, so the header always fits.
    ``pixels``: the channels and statistics the panels are normalised with; ``bands``: what is shown."""
    names = [k for k in panels if not k.startswith("_")]
    shown = display_bands(panels[names[0]].shape[1], bands)
    scale = display_scale(panels[names[0]], pixels, shown)
    rows = [_to_uint8(panels[k], pixels, shown, scale).permute(0, 2, 3, 1).cpu() for k in names]
    n, h, w, _ = rows[0].shape
    pad = 4
    width = len(names) * (w + pad) + pad
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(measure.textbbox((0, 0), "Ag")[3]) + 3
    name_lines = [_fit(measure, name, w) for name in names]
    caption_lines = _fit(measure, caption, width - 2 * pad)
    names_h = line_h * max(len(x) for x in name_lines)
    header = 2 + names_h + 4 + line_h * len(caption_lines) + 2
    fig = Image.new("RGB", (width, n * (h + pad) + pad + header), "white")
    draw = ImageDraw.Draw(fig)
    for c, lines in enumerate(name_lines):
        for i, line in enumerate(lines):
            draw.text((pad + c * (w + pad), 2 + line_h * i), line, fill="black")
    for i, line in enumerate(caption_lines):
        draw.text((pad, 2 + names_h + 4 + line_h * i), line, fill="black")
    sm = panels["_sm"]
    for r in range(n):
        for c, imgs in enumerate(rows):
            x0, y0 = pad + c * (w + pad), header + pad + r * (h + pad)
            fig.paste(Image.fromarray(imgs[r].numpy()), (x0, y0))
            if names[c] == "seen":  # mark secondary-masked units: kept by sampling, hidden by the token
                for u in sm[r].flatten().nonzero().flatten().tolist():
                    uy, ux = divmod(u, sm.shape[-1])
                    box = (x0 + ux * unit, y0 + uy * unit, x0 + (ux + 1) * unit - 1, y0 + (uy + 1) * unit - 1)
                    draw.rectangle(box, outline=(255, 64, 64))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(path)
    return path


def spread_indices(total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)`` (first and last included): over a class-sorted
    image list they cover the classes instead of taking the first class's images."""
    if total <= n:
        return list(range(total))
    if n == 1:
        return [0]
    return sorted({round(j * (total - 1) / (n - 1)) for j in range(n)})


def mask_legend(model) -> str:
    """What the figure's hidden units are, in the model's own words (its contract's ``mask_note``),
    and the red outline only for models that use secondary masking."""
    contract = model.contract
    parts = [contract.mask_note]
    if contract.secondary_mask and contract.vis_mask_ratio > 0:
        parts.append("red outline = secondary-masked (kept by sampling, replaced by the mask token)")
    return "; ".join(parts)


def caption_for(model, denorm: str) -> str:
    if not model.contract.norm_pix_loss:
        targets = "pixel targets: predictions shown as they are"
    elif denorm == "true":
        targets = "norm-pix: de-normalised with each unit's TRUE mean/std (leaks hidden statistics)"
    else:
        targets = "norm-pix: de-normalised with the nearest seen unit's mean/std (no leak)"
    return f"{targets}; {mask_legend(model)}"


def figure_transform(size: int, pixels: Pixels = RGB):
    """What a figure shows of an image: resized (bicubic) and centre-cropped to ``size``, normalised
    (an RGB PIL image; for another channel count a (C, H, W) float tensor, imagedata.channels)."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode
    if pixels.arrays:
        return transforms.Compose([transforms.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                                   transforms.CenterCrop(size), transforms.Normalize(pixels.mean, pixels.std)])
    return transforms.Compose([transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(pixels.mean, pixels.std)])


def write_reconstruction(model, imgs: Tensor, mask: Tensor, sm_mask: Optional[Tensor], path: str | Path,
                         title: str, denorm: str = "neighbour", pixels: Pixels = RGB,
                         bands: Optional[Sequence[int]] = None) -> Path:
    """The reconstruction figure of ``imgs`` (N, C, H, W) under ``mask`` / ``sm_mask``, captioned
    ``title`` and what the panels show; the model's training mode is restored afterwards. ``pixels``:
    the statistics ``imgs`` are normalised with; ``bands``: the channels shown (display_bands)."""
    was_training = model.training
    model.eval()
    try:
        panels = reconstruct(model, imgs, mask, sm_mask, denorm=denorm)
    finally:
        model.train(was_training)
    shown = display_bands(imgs.shape[1], bands)
    view = "" if shown == (0, 1, 2) and imgs.shape[1] == 3 else \
        f"; {'channel' if len(shown) == 1 else 'channels'} {', '.join(map(str, shown))} of {imgs.shape[1]}" + \
        ("" if display_scale(imgs, pixels, shown) is None else ", stretched to the originals' 1-99th percentiles")
    return save_figure(panels, path, f"{title}; {caption_for(model, denorm)}{view}", model.contract.stride, pixels,
                       shown)


def figure_images(images, input_size: int, pixels: Pixels = RGB) -> Tensor:
    """The images every reconstruction figure of a run shows: (k <= 4, C, S, S), normalised, on the CPU.

    Picked once at start-up from the training set's own list (``images``: the data set's ImageList or
    ShardImages), spread over it, an unreadable pick replaced by the next readable image; decoded in
    full (no reduced-scale JPEG decoding) as the PIL path would. No figure lists or reads the training
    set again, so rank 0 spends no time on it while the other ranks wait."""
    import copy
    import io

    from imagedata.images import Encoded
    full = copy.copy(images)            # the training list's own settings stay as they are
    full.min_side, full.raw = None, False
    tf = figure_transform(input_size, pixels)
    picked = []
    for start in spread_indices(len(full), 4):
        for i in range(start, len(full)):
            try:
                img = full.load(i)[0]
                if isinstance(img, Encoded):
                    img = Image.open(io.BytesIO(img.data)).convert("RGB")
                picked.append(tf(img))
                break
            except Exception:
                continue
    if not picked:
        raise ValueError("no training image could be read for the reconstruction figures")
    return torch.stack(picked)
