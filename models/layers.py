"""Small building blocks shared by the Swin and PVT encoders."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

# The reference builds every "outer" norm with eps 1e-6 (patch embedding, patch
# merging, final norms, decoder, fc_norm) but leaves the encoder blocks' own
# norms at PyTorch's default 1e-5. Both are reproduced exactly.
OuterNorm: Callable[[int], nn.LayerNorm] = partial(nn.LayerNorm, eps=1e-6)
BlockNorm: Callable[[int], nn.LayerNorm] = partial(nn.LayerNorm, eps=1e-5)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution, optional LayerNorm.

    imgs: (N, C_in, H, W) -> (N, H/p, W/p, C) channel-last.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = OuterNorm(embed_dim) if norm else None

    def forward(self, imgs: Tensor) -> Tensor:
        x = self.proj(imgs).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PatchMerge(nn.Module):
    """2x2 stride-2 convolution between stages (optionally LayerNorm first).

    x: (N, H, W, C_in) -> (N, H/2, W/2, C_out).
    """

    def __init__(self, in_dim: int, out_dim: int, norm: bool) -> None:
        super().__init__()
        self.norm = OuterNorm(in_dim) if norm else None
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def pad_to_multiple(imgs: Tensor, multiple: int) -> Tensor:
    """Zero-pad (N, C, H, W) right / bottom so that H and W are multiples of ``multiple``."""
    ph, pw = (-imgs.shape[-2]) % multiple, (-imgs.shape[-1]) % multiple
    return F.pad(imgs, (0, pw, 0, ph)) if ph or pw else imgs


def drop_path_rates(depths: Sequence[int], rate: float) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over all blocks."""
    total = sum(depths)
    return [rate * i / max(total - 1, 1) for i in range(total)]


class StagePyramid:
    """What dense-prediction programs ask of a stage-wise classifier (``stage_dims``, ``patch_size``):
    the channels and strides of its ``forward_pyramid`` maps. Each model adds ``pyramid_divisor``."""

    @property
    def pyramid_channels(self) -> list[int]:
        """Channels of the ``forward_pyramid`` maps."""
        return list(self.stage_dims)

    @property
    def pyramid_strides(self) -> list[int]:
        """Strides (input pixels per map pixel) of the ``forward_pyramid`` maps."""
        return [self.patch_size * 2 ** s for s in range(len(self.stage_dims))]


def init_reference_weights(model: nn.Module) -> None:
    """The reference initialisation of the Swin / PVT models: ``init_modules`` (conv fan_out), then
    the patch-embedding convolution xavier-uniform on its (out, in*k*k) view."""
    init_modules(model.modules())
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        w = patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))


def init_modules(modules, conv: str = "fan_out") -> None:
    """Linear: xavier-uniform, bias 0; LayerNorm: 1, 0. Conv2d by ``conv``: "fan_out" normal(0,
    sqrt(2 / fan_out)) with bias 0 (the reference's Swin / PVT), "xavier" xavier-uniform on the
    (out, in*k*k) view (GreenMIM), "keep" left as built (MixMAE, Hiera MAE)."""
    if conv not in ("fan_out", "xavier", "keep"):
        raise ValueError(f"conv init must be fan_out, xavier or keep (got {conv!r})")
    for m in modules:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and conv == "fan_out":
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.data.normal_(0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and conv == "xavier":
            nn.init.xavier_uniform_(m.weight.data.view(m.weight.shape[0], -1))


def valid_sizes_message(size: int, is_valid: Callable[[int], bool], step: int, what: str) -> str:
    """An error message naming the valid input sizes nearest to ``size``."""
    below = next((s for s in range(size - size % step, 0, -step) if s != size and is_valid(s)), None)
    above = next((s for s in range(size - size % step + step, size + 64 * step, step) if is_valid(s)), None)
    near = [str(s) for s in (below, above) if s is not None]
    return f"{what}: input size {size} does not fit this model; nearest valid sizes: {', '.join(near) or 'none'}"


def check_images_and_mask(model: nn.Module, imgs: Tensor, mask: Tensor) -> None:
    """A pretraining model's input check: (N, C, S, S) images at its size, an (N, T*T) unit mask."""
    size, t = model.token_size * model.stride, model.token_size
    if imgs.dim() != 4 or imgs.shape[-2:] != (size, size):
        raise ValueError(f"{type(model).__name__} built for {size}-px inputs got images of shape {tuple(imgs.shape)}")
    if mask.shape != (imgs.shape[0], t * t):
        raise ValueError(f"mask must be (N, {t * t}) for {t}x{t} units, got {tuple(mask.shape)}")
