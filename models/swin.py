"""Swin Transformer as the UM-MAE reference has it, and its classifier.

Differences from the official Swin, all kept for checkpoint compatibility:
  * the relative position bias is a continuous MLP (``attn.posmlp``: 1x1 conv
    2 -> posmlp_dim, ReLU, 1x1 conv -> heads) of the log-spaced offset
    ``sign(d) * log(1 + |d|)``, d = key position - query position;
  * positions are carried with the tokens (``pos``), so that a compact UM-MAE
    image still sees the true distances between its tokens;
  * patch merging is LayerNorm + 2x2 stride-2 conv, owned by the first block of
    stages 2-4 (``blocks.i.downsample``), in one flat ``blocks`` list.

Speed: the position MLP depends only on the offset, and offsets live on a small
integer lattice, so each block evaluates the MLP once per distinct offset and
gathers the bias per token pair (bitwise the same values as evaluating it per
pair). Attention goes through ``scaled_dot_product_attention`` with the bias
(plus the shifted-window mask) as an additive mask.

Precision and layout of the bias: the offset table is computed and gathered in
float32 (float64 for a float64 model) even under autocast, and only the gathered
bias is cast to the attention's dtype, so the gradient of the gather accumulates
in float32. The bias is gathered heads-first, so the mask reaches SDPA with unit
last stride and every other stride a multiple of 8, which the memory-efficient
kernel uses as it is (an unaligned mask is padded into a copy on every call).

Shared bias: on a regular token grid (SimMIM's full image, finetuning, dense
inputs) every window of a block has the same offsets, so the block gathers one
``(heads, n, n)`` bias instead of one per window. With shifted windows only the
last window row and column differ (their shift mask, and the wrapped offsets under
it), so the windows are attended in four groups (interior, last column, last row,
corner), each with its own shared bias. UM-MAE's compact image carries each
sample's own kept positions, so there each window keeps its own bias.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from .contract import Classifier
from .layers import (BlockNorm, OuterNorm, PatchEmbed, PatchMerge, StagePyramid, drop_path_rates,
                     init_reference_weights, pad_to_multiple, valid_sizes_message)
from .registry import register_named

__all__ = ["SwinEncoder", "Swin", "window_geometry", "swin_grid_ok"]


def window_geometry(h: int, w: int, window_size: int, shifted: bool) -> tuple[int, int, int]:
    """(window_h, window_w, shift) of a block on an h x w map: a map no larger
    than the window is one whole-map window without shift (as the reference)."""
    if min(h, w) <= window_size:
        return h, w, 0
    return window_size, window_size, (window_size // 2 if shifted else 0)


def swin_grid_ok(grid: int, window_size: int, num_stages: int = 4) -> bool:
    """Whether a square token grid works for every stage's windows."""
    for s in range(num_stages):
        if grid % (1 << s):
            return False
        g = grid >> s
        if g > window_size and g % window_size:
            return False
    return grid >= (1 << (num_stages - 1))


@dataclass
class Positions:
    """Token positions carried through the encoder.

    pos: (P, H, W, 2) int64 [row, col] in units of the first stage's token grid
    (P = batch, or 1 when all samples share them); a stage's own coordinates are
    ``pos / scale``. Offsets between tokens are multiples of ``step``.
    ``extent``: (rows, cols) of the first-stage grid, bounding every coordinate.
    ``regular``: the positions are one shared lattice (``grid``), so windows at the same
    place in their window row / column share their offsets (the shared-bias path).
    """
    pos: Tensor
    extent: tuple[int, int]
    scale: int = 1
    step: int = 1
    max_step: int = 1 << 30
    regular: bool = False
    cache: dict = field(default_factory=dict)

    def downsample(self) -> "Positions":
        scale = self.scale * 2
        return Positions(self.pos[:, ::2, ::2], self.extent, scale, min(scale, self.max_step), self.max_step,
                         self.regular)

    def padded(self, h: int, w: int) -> "Positions":
        """This stage's regular grid extended to ``h x w`` (right / bottom padding for windows).

        Only for the dense (unmasked) path, where the positions are one shared regular grid:
        padded tokens continue the lattice, so real tokens keep their true offsets.
        """
        if self.pos.shape[0] != 1:
            raise ValueError("window padding needs the shared regular grid of an unmasked image")
        s, dev = self.scale, self.pos.device
        rows = torch.arange(h, device=dev).view(h, 1).expand(h, w) * s
        cols = torch.arange(w, device=dev).view(1, w).expand(h, w) * s
        return Positions(torch.stack([rows, cols], dim=-1).unsqueeze(0), (h * s, w * s), s, self.step, self.max_step,
                         self.regular)

    @staticmethod
    def grid(h: int, w: int, device: torch.device) -> "Positions":
        rows = torch.arange(h, device=device).view(h, 1).expand(h, w)
        cols = torch.arange(w, device=device).view(1, w).expand(h, w)
        return Positions(torch.stack([rows, cols], dim=-1).unsqueeze(0), (h, w), regular=True)


def _windows(x: Tensor, wh: int, ww: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, wh * ww, C)"""
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def _unwindows(x: Tensor, wh: int, ww: int, b: int, h: int, w: int) -> Tensor:
    """(B * nW, wh * ww, C) -> (B, H, W, C)"""
    c = x.shape[-1]
    x = x.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def _region_labels(h: int, w: int, wh: int, ww: int, shift: int, device: torch.device) -> Tensor:
    """The shifted-window regions of the rolled map, per window: (nW, n) float labels."""
    region = torch.zeros(h, w, device=device)
    label = 0
    for hs in (slice(0, -wh), slice(-wh, -shift), slice(-shift, None)):
        for ws in (slice(0, -ww), slice(-ww, -shift), slice(-shift, None)):
            region[hs, ws] = label
            label += 1
    return _windows(region.view(1, h, w, 1), wh, ww).squeeze(-1)


def _shift_mask(h: int, w: int, wh: int, ww: int, shift: int, device: torch.device,
                windows: Optional[Tensor] = None) -> Tensor:
    """The shifted-window mask: 0 within a region, -100 across regions. (nW, n, n), or only the
    windows listed in ``windows`` (raster window ids)."""
    win = _region_labels(h, w, wh, ww, shift, device)
    if windows is not None:
        win = win[windows]
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def _offset_index(positions: Positions, h: int, w: int, wh: int, ww: int, shift: int,
                  windows: Optional[Tensor] = None) -> tuple[Tensor, int]:
    """Index of every (query, key) offset in the offset table, and the table's half-width.

    Returns idx: (P * nW, n, n) int64 (or (P * len(windows), n, n) for the raster window ids
    ``windows``), with d = key - query mapped to ``(d_h / step + K_h) * (2 K_w + 1) + (d_w / step + K_w)``.
    """
    pos = positions.pos
    if shift:
        pos = torch.roll(pos, shifts=(-shift, -shift), dims=(1, 2))
    p = _windows(pos, wh, ww)                              # (P*nW, n, 2)
    if windows is not None:
        nw = (h // wh) * (w // ww)
        p = p.view(-1, nw, wh * ww, 2)[:, windows].reshape(-1, wh * ww, 2)
    d = p.unsqueeze(1) - p.unsqueeze(2)                    # d[b, i, j] = p_j - p_i
    step = positions.step
    kh = (positions.extent[0] - 1) // step
    kw = (positions.extent[1] - 1) // step
    d = torch.div(d, step, rounding_mode="floor")
    idx = (d[..., 0] + kh) * (2 * kw + 1) + (d[..., 1] + kw)
    return idx, kh


def _aligned(n: int) -> int:
    """n rounded up to a multiple of 8: the row length of a mask the memory-efficient kernel takes as is."""
    return -(-n // 8) * 8


@dataclass
class WindowLayout:
    """How one block (one geometry and shift) attends: built once per forward, shared by the blocks
    of a stage that have the same geometry.

    index: (R, n, n8) offset index (n8 = n rounded up to 8; padded columns index 0 and are cut off);
    shift_mask: (S, n, n8) or None, added to every run of S consecutive rows of the gathered bias;
    groups: None: R = B*nW, one bias per window; else the number
    of consecutive windows of each group (R groups) in the gathered window order, each attending with
    its group's bias shared by all its windows; gather / scatter: (B*H*W,) the token order of the
    grouped windows and back (None: the plain window partition).
    """
    index: Tensor
    shift_mask: Optional[Tensor]
    positions: Positions
    groups: Optional[list[int]] = None
    gather: Optional[Tensor] = None
    scatter: Optional[Tensor] = None


def _pad_cols(t: Tensor, n8: int, value: float = 0) -> Tensor:
    return t if t.shape[-1] == n8 else F.pad(t, (0, n8 - t.shape[-1]), value=value)


def window_layout(positions: Positions, b: int, h: int, w: int, wh: int, ww: int, shift: int,
                  device: torch.device) -> WindowLayout:
    """The layout of a block on an h x w map (already padded to window multiples) for batch b."""
    n, n8 = wh * ww, _aligned(wh * ww)
    gh, gw = h // wh, w // ww
    if not positions.regular:
        idx, _ = _offset_index(positions, h, w, wh, ww, shift)
        p = positions.pos.shape[0]
        if p != b:
            if p != 1:
                raise ValueError(f"positions for {p} samples, but a batch of {b}")
            idx = idx.repeat(b, 1, 1)
        mask = _shift_mask(h, w, wh, ww, shift, device) if shift else None
        return WindowLayout(_pad_cols(idx, n8), None if mask is None else _pad_cols(mask, n8), positions)
    if not shift:  # every window has the offsets of the first one
        idx, _ = _offset_index(positions, h, w, wh, ww, 0, torch.tensor([0], device=device))
        return WindowLayout(_pad_cols(idx, n8), None, positions, groups=[b * gh * gw])
    # Rolled by -shift, the last window row and column hold wrapped tokens: four groups of windows
    # with one offset pattern and one shift-mask pattern each (interior, last column, last row, corner).
    wid = torch.arange(gh * gw, device=device).view(gh, gw)
    parts = [wid[:-1, :-1], wid[:-1, -1:], wid[-1:, :-1], wid[-1:, -1:]]
    reps = torch.stack([part[0, 0] for part in parts])
    idx, _ = _offset_index(positions, h, w, wh, ww, shift, reps)
    mask = _shift_mask(h, w, wh, ww, shift, device, reps)
    # token of the rolled map at (r, c) = token of the map at ((r + shift) % h, (c + shift) % w)
    src_r = ((torch.arange(h, device=device) + shift) % h).view(gh, 1, wh, 1)
    src_c = ((torch.arange(w, device=device) + shift) % w).view(1, gw, 1, ww)
    win_tok = (src_r * w + src_c).reshape(gh * gw, n)                  # window id -> its tokens
    base = (torch.arange(b, device=device) * (h * w)).view(b, 1, 1)
    gather = torch.cat([(base + win_tok[part.reshape(-1)]).reshape(-1) for part in parts])
    scatter = torch.empty_like(gather)
    scatter[gather] = torch.arange(gather.numel(), device=device)
    return WindowLayout(_pad_cols(idx, n8), _pad_cols(mask, n8), positions,
                        groups=[b * part.numel() for part in parts], gather=gather, scatter=scatter)


class WindowAttention(nn.Module):
    """Window self-attention with the continuous position-MLP bias."""

    def __init__(self, dim: int, num_heads: int, posmlp_dim: int = 32) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.posmlp = nn.Sequential(nn.Conv2d(2, posmlp_dim, 1), nn.ReLU(), nn.Conv2d(posmlp_dim, num_heads, 1))

    def offset_table(self, positions: Positions, dtype: torch.dtype) -> Tensor:
        """The bias of every offset on the lattice: (T, heads), in ``dtype`` whatever autocast says."""
        step, scale = positions.step, positions.scale
        kh = (positions.extent[0] - 1) // step
        kw = (positions.extent[1] - 1) // step
        dev = positions.pos.device
        with torch.autocast(dev.type, enabled=False):
            dh = torch.arange(-kh, kh + 1, device=dev, dtype=dtype) * step / scale
            dw = torch.arange(-kw, kw + 1, device=dev, dtype=dtype) * step / scale
            rel = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).reshape(-1, 2)
            rel = torch.sign(rel) * torch.log1p(rel.abs())
            w0, b0 = self.posmlp[0].weight, self.posmlp[0].bias
            w2, b2 = self.posmlp[2].weight, self.posmlp[2].bias
            hidden = F.relu(F.linear(rel, w0.flatten(1).to(dtype), b0.to(dtype)))
            return F.linear(hidden, w2.flatten(1).to(dtype), b2.to(dtype))

    def position_bias(self, layout: WindowLayout, dtype: torch.dtype) -> Tensor:
        """(R, heads, n, n) additive mask in ``dtype``, heads-first and 8-aligned (see the module doc)."""
        r, n, n8 = layout.index.shape
        table_dtype = torch.float64 if self.qkv.weight.dtype == torch.float64 else torch.float32
        table = self.offset_table(layout.positions, table_dtype)            # (T, heads)
        # index_select: its backward (index_add) is deterministic on CPU, unlike table[idx]'s index_put
        bias = table.t().index_select(1, layout.index.reshape(-1)).view(self.num_heads, r, n, n8)
        if layout.shift_mask is not None:
            s = layout.shift_mask.shape[0]
            bias = (bias.view(self.num_heads, r // s, s, n, n8) + layout.shift_mask).view(self.num_heads, r, n, n8)
        return bias.to(dtype).permute(1, 0, 2, 3)[..., :n]

    def forward(self, x: Tensor, layout: WindowLayout) -> Tensor:
        """x: (B*nW, n, C) windows in the layout's order -> (B*nW, n, C)."""
        bw, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.position_bias(layout, q.dtype)
        if layout.groups is None:   # one bias per window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
        else:  # each group's windows share its bias: (1, heads, n, n) broadcast over the group
            outs, start = [], 0
            for g, count in enumerate(layout.groups):
                sl = slice(start, start + count)
                outs.append(F.scaled_dot_product_attention(q[sl], k[sl], v[sl], attn_mask=bias[g:g + 1]).transpose(1, 2))
                start += count
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return self.proj(out.reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm window attention + MLP; shifted windows on odd blocks of a stage."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool, mlp_ratio: float = 4.0,
                 posmlp_dim: int = 32, drop_path: float = 0.0, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.downsample = downsample
        self.norm1 = BlockNorm(dim)
        self.attn = WindowAttention(dim, num_heads, posmlp_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = BlockNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, positions: Positions) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)"""
        b, h, w, c = x.shape
        wh, ww, shift = window_geometry(h, w, self.window_size, self.shifted)
        # dense inputs of any size: pad the normalised map to window multiples (right / bottom),
        # attend over the padded windows and crop; window-multiple maps take no padding
        hp, wp = h + (-h) % wh, w + (-w) % ww
        key = (b, h, w, wh, ww, shift)
        if key not in positions.cache:
            pos = positions if (hp, wp) == (h, w) else positions.padded(hp, wp)
            positions.cache[key] = window_layout(pos, b, hp, wp, wh, ww, shift, x.device)
        layout = positions.cache[key]

        y = self.norm1(x)
        if (hp, wp) != (h, w):
            y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))
        if layout.gather is not None:   # shift and group order in one gather, and back
            y = y.reshape(-1, c).index_select(0, layout.gather).view(-1, wh * ww, c)
            y = self.attn(y, layout).reshape(-1, c).index_select(0, layout.scatter).view(b, hp, wp, c)
        else:
            if shift:
                y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            y = _unwindows(self.attn(_windows(y, wh, ww), layout), wh, ww, b, hp, wp)
            if shift:
                y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        if (hp, wp) != (h, w):
            y = y[:, :h, :w]
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinEncoder(nn.Module):
    """Patch embedding + the flat block list. Subclasses add heads or decoders.

    Stage s has width ``embed_dim * 2**s``; the first block of stages 2-4 owns the
    patch merging.
    """

    def __init__(self, img_size: int = 256, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 16, mlp_ratio: float = 4.0, posmlp_dim: int = 32,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.window_size = window_size
        self.depths = tuple(depths)
        self.embed_dim = embed_dim
        self.stage_dims = [embed_dim * 2 ** s for s in range(len(depths))]
        self.num_features = self.stage_dims[-1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=True)
        dpr = drop_path_rates(depths, drop_path_rate)
        blocks = []
        for s, depth in enumerate(depths):
            for i in range(depth):
                down = None
                if s > 0 and i == 0:
                    down = PatchMerge(self.stage_dims[s - 1], self.stage_dims[s], norm=True)
                blocks.append(SwinBlock(self.stage_dims[s], num_heads[s], window_size, shifted=i % 2 == 1,
                                        mlp_ratio=mlp_ratio, posmlp_dim=posmlp_dim, drop_path=dpr[len(blocks)],
                                        downsample=down))
        self.blocks = nn.ModuleList(blocks)

    def run_blocks(self, x: Tensor, positions: Positions) -> list[Tensor]:
        """x: (B, H, W, C) channel-last first-stage tokens -> each stage's last output (B, h, w, C_s)."""
        outs = []
        for blk in self.blocks:
            if blk.downsample is not None:
                outs.append(x)
                x = blk.downsample(x)
                positions = positions.downsample()
            x = blk(x, positions)
        outs.append(x)
        return outs

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


class Swin(StagePyramid, SwinEncoder, Classifier):
    """Swin classifier for finetuning: global average pool -> ``fc_norm`` -> ``head``.

    imgs: (N, 3, H, W) -> logits (N, num_classes). Any square input whose token
    grid fits the windows at every stage works (256 and 512 for window 16).
    """

    family = "swin"

    def __init__(self, img_size: int = 256, num_classes: int = 1000, global_pool: bool = True,
                 **kwargs) -> None:
        if not global_pool:  # the reference's constructors take the flag; average pooling is the only head
            raise ValueError("Swin classifiers pool by averaging the last stage's tokens (global_pool=True)")
        super().__init__(img_size=img_size, **kwargs)
        grid_ok = lambda s: s % self.patch_size == 0 and swin_grid_ok(s // self.patch_size, self.window_size)
        if not grid_ok(img_size):
            raise ValueError(valid_sizes_message(img_size, grid_ok, self.patch_size * 8,
                                                 f"Swin (patch {self.patch_size}, window {self.window_size})"))
        self.num_classes = num_classes
        self.fc_norm = OuterNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_reference_weights(self)

    @property
    def pyramid_divisor(self) -> int:
        """``forward_pyramid`` pads its input (right / bottom) to a multiple of this."""
        return self.patch_size * 2 ** (len(self.stage_dims) - 1)

    def forward_pyramid(self, imgs: Tensor) -> list[Tensor]:
        """The four stage feature maps for dense prediction: [(N, C_s, ceil(H/32)*8/2**s, ...)].

        Any H, W: the input is zero-padded right / bottom to ``pyramid_divisor`` and every block
        pads its map to window multiples, so 800 x 1333 works as well as the pretraining size.
        """
        x = self.patch_embed(pad_to_multiple(imgs, self.pyramid_divisor))
        outs = self.run_blocks(x, Positions.grid(x.shape[1], x.shape[2], x.device))
        return [o.permute(0, 3, 1, 2).contiguous() for o in outs]

    def forward_features(self, imgs: Tensor) -> Tensor:
        """imgs -> final tokens (N, h*w, C)."""
        x = self.patch_embed(imgs)
        x = self.run_blocks(x, Positions.grid(x.shape[1], x.shape[2], x.device))[-1]
        return x.flatten(1, 2)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.fc_norm(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(imgs))


_SWIN_SIZES = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), posmlp_dim=32),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), posmlp_dim=32),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), posmlp_dim=32),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), posmlp_dim=64),
    # tests and demos: well under a million parameters
    "pico": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), posmlp_dim=16),
}


def _register(name: str, size: str, img_size: int, window_size: int, doc: str, **extra) -> None:
    def build(**kwargs) -> Swin:
        return Swin(**{**_SWIN_SIZES[size], "img_size": img_size, "window_size": window_size, **extra, **kwargs})
    register_named(name, build, doc, task="classify", namespace=globals())


for _size in ("tiny", "small", "base", "large"):
    _register(f"swin_{_size}_256", _size, 256, 16, f"Swin-{_size} classifier, 256 px, window 16.")
_register("swin_large_256_pm32", "large", 256, 16, "Swin-L with a 32-wide position MLP: the classifier of "
          "mae_swin_large_256_dec512d2b (the reference's 2-block-decoder Swin-L keeps Swin-T's width).", posmlp_dim=32)
_register("swin_pico_128", "pico", 128, 8,
          "Tiny test/demo classifier: finetunes mae_swin_pico_128 (window 8 at 128 px = window 4 pretraining).")
_register("swin_pico_p1_32", "pico", 32, 8, "Tiny classifier for 32-px images: patch 1, window 8 on the 32x32 "
          "token grid; finetunes mae_swin_pico_p1_32 / simmim_swin_pico_p1_32.", patch_size=1)
