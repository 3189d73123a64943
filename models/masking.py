"""Mask generation: the one place where masks are drawn.

Every function is batched tensor code that runs on the training device and
draws from an explicit ``torch.Generator`` so that a run is reproducible from
its seed (and its generator state can be checkpointed for exact resume).

Convention (as the UM-MAE reference): a mask is a ``(N, L)`` bool tensor over
a ``T x T`` grid of mask units in raster order, ``True`` = removed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "uniform_mask",
    "random_mask",
    "secondary_mask",
    "kept_index_per_group",
    "draw_masks",
    "num_removed",
]


def num_removed(num_units: int, mask_ratio: float, rounding: str = "keep") -> int:
    """How many of ``num_units`` a random mask removes.

    ``"keep"`` (MAE, SimMIM, GreenMIM): ``len_keep = int(L * (1 - r))`` units stay, so
    ``L - int(L * (1 - r))`` are removed (37 of 49 at r = 0.75). ``"remove"`` (MixMAE):
    ``int(L * r)`` units are set (24 of 49 at r = 0.5). The two differ whenever ``L * r`` is
    not an integer; both are written with Python floats exactly as the originals compute them.
    """
    if rounding == "keep":
        return num_units - int(num_units * (1 - mask_ratio))
    if rounding == "remove":
        return int(num_units * mask_ratio)
    raise ValueError(f"rounding must be 'keep' or 'remove' (got {rounding!r})")


def _check_token_size(token_size: int) -> None:
    if token_size < 2 or token_size % 2:
        raise ValueError(f"token_size must be an even number >= 2 (got {token_size}): "
                         "uniform sampling keeps one unit in every 2x2 group")


def uniform_mask(batch: int, token_size: int, *, generator: Optional[torch.Generator] = None,
                 device: Optional[torch.device | str] = None) -> Tensor:
    """Uniform Sampling: each non-overlapping 2x2 group keeps exactly one unit.

    The kept unit is chosen uniformly and independently per group, so the
    masked ratio is exactly 0.75.

    Returns: mask (batch, token_size**2) bool, True = removed, raster order.
    """
    _check_token_size(token_size)
    g = token_size // 2
    device = generator.device if (device is None and generator is not None) else device
    kept = torch.randint(0, 4, (batch, g, g), generator=generator, device=device)
    # one_hot over the 4 cells (TL, TR, BL, BR) -> (N, g, g, 2, 2) -> raster (N, g, 2, g, 2)
    keep = torch.nn.functional.one_hot(kept, 4).view(batch, g, g, 2, 2).permute(0, 1, 3, 2, 4)
    return keep.reshape(batch, token_size * token_size) == 0


def random_mask(batch: int, num_units: int, mask_ratio: float, *,
                generator: Optional[torch.Generator] = None,
                device: Optional[torch.device | str] = None, rounding: str = "keep") -> Tensor:
    """Random Sampling: exactly ``num_removed(num_units, mask_ratio, rounding)`` units removed
    (MAE's ``L - int(L * (1 - r))`` by default), uniformly at random per sample.

    Returns: mask (batch, num_units) bool, True = removed.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1) (got {mask_ratio})")
    device = generator.device if (device is None and generator is not None) else device
    num_masked = num_removed(num_units, mask_ratio, rounding)
    noise = torch.rand(batch, num_units, generator=generator, device=device)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return rank < num_masked


def secondary_mask(mask: Tensor, vis_mask_ratio: float, *,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Secondary Masking: of the K kept units of each sample, exactly
    ``K - int(K * (1 - vis_mask_ratio))`` chosen uniformly at random.

    mask: (N, L) bool, True = removed.
    Returns: sm (N, L) bool, True = kept unit that becomes secondary-masked
    (always a subset of ``~mask``).
    """
    if not 0.0 <= vis_mask_ratio < 1.0:
        raise ValueError(f"vis_mask_ratio must be in [0, 1) (got {vis_mask_ratio})")
    kept = ~mask.bool()
    noise = torch.rand(mask.shape, generator=generator, device=mask.device)
    noise = noise.masked_fill(~kept, 2.0)  # removed units sort last
    rank = noise.argsort(dim=1).argsort(dim=1)
    num_kept = kept.sum(dim=1, keepdim=True).double()
    # Same arithmetic as Python's int(K * (1 - r)) in float64, but without a host sync.
    stay_visible = torch.floor(num_kept * (1.0 - vis_mask_ratio))
    return kept & (rank >= stay_visible)


def kept_index_per_group(mask: Tensor, token_size: int) -> Tensor:
    """For a uniform mask, the cell (0=TL, 1=TR, 2=BL, 3=BR) kept in each 2x2 group.

    mask: (N, T*T) bool. Returns: (N, T/2, T/2) int64.
    """
    n = mask.shape[0]
    g = token_size // 2
    cells = mask.view(n, g, 2, g, 2).permute(0, 1, 3, 2, 4).reshape(n, g, g, 4)
    return (~cells.bool()).to(torch.uint8).argmax(dim=-1)


def check_uniform_mask(mask: Tensor, token_size: int) -> None:
    """Raise if ``mask`` does not keep exactly one unit per 2x2 group."""
    if mask.dim() != 2 or mask.shape[1] != token_size * token_size:
        raise ValueError(f"mask must be (N, {token_size * token_size}) for a {token_size}x{token_size} "
                         f"unit grid, got {tuple(mask.shape)}")
    n, g = mask.shape[0], token_size // 2
    cells = mask.view(n, g, 2, g, 2).permute(0, 1, 3, 2, 4).reshape(n, g, g, 4)
    ok = ((~cells.bool()).sum(-1) == 1).all()
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError("pyramid UM-MAE models need uniform masks (exactly one kept unit per "
                             "2x2 group); use --mask_regular")
    else:  # no host sync on accelerators
        torch._assert_async(ok, "pyramid UM-MAE models need uniform masks (one kept unit per 2x2 group)")


def draw_masks(batch: int, token_size: int, mask_ratio: float, regular: bool, *,
               generator: Optional[torch.Generator] = None,
               device: Optional[torch.device | str] = None, rounding: str = "keep") -> Tensor:
    """The masks of one training batch, as the pretraining flags describe them (``rounding``: the
    model's ``mask_rounding``, see ``num_removed``)."""
    if regular:
        if mask_ratio != 0.75:
            raise ValueError(f"--mask_regular (uniform sampling) needs --mask_ratio 0.75, got {mask_ratio}")
        return uniform_mask(batch, token_size, generator=generator, device=device)
    return random_mask(batch, token_size * token_size, mask_ratio, generator=generator, device=device,
                       rounding=rounding)
