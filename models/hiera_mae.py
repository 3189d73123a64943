"""Hiera MAE (arXiv 2306.00989) on timm's ``Hiera`` encoder, and the timm Hiera classifiers.

Hiera is a hierarchical ViT built so that MAE can drop masked units outright:

1. Masks are drawn over *mask units* of 32 px (8x8 patch-4 tokens) by ``models.masking``:
   random, ``mask_ratio`` 0.6; every mask of a batch removes the same number of units.
2. Only the kept units are patch-embedded: each unit's pixels with a 3-px halo are cut out of
   the image whose removed units are zeroed (exactly what timm's masked forward convolves),
   so no compute is spent on removed units. Tokens are laid out in timm's *unrolled* order
   (the strides of the three q-poolings outermost, the unit innermost), so timm's blocks run
   unchanged: mask-unit attention in stages 1-2, global attention in stages 3-4, q-pooling by
   max over the outer stride.
3. Multi-scale fusion: each stage output is rerolled to ``(N, K, h, w, C)`` per kept unit; the
   outputs of the first ``q_pool`` stages (8x8 and 4x4 tokens per unit) are brought to the last
   stage's 2x2 tokens per unit by a strided conv (kernel = stride = h / 2), summed with the last
   stage (stage 3 has the last stage's resolution and is skipped, as in the original), then
   LayerNorm-ed (timm's ``head.norm``: the encoder keys are timm's, see below).
4. Decoder (MAE): a linear embedding to 512-d, a mask token for every token of a removed unit,
   a learned position embedding on the final 14x14 token grid, 8 global-attention Hiera blocks,
   and a linear prediction of the 16x16x3 pixels of every final token.
   Loss: MSE on the tokens of removed units, targets normalised per 16-px patch (norm-pix).

The state dict of the encoder is exactly timm's ``hiera_*_224`` (``patch_embed.*``,
``pos_embed``, ``blocks.*``, ``head.norm.*``; only ``head.fc`` is missing), so pretrained
weights load into timm's classifiers and the ones registered here unchanged; timm's released
``hiera_*_224.mae`` files load the other way. The fusion heads and decoder carry the original
names (``multi_scale_fusion_heads.*``, ``decoder_*``, ``mask_token``).

Returned predictions follow the framework: ``pred[:, u]`` is mask unit u in raster order,
32x32x3 pixels (row, column, channel). ``norm_pix_unit`` (16) tells figures the patch size
over which norm-pix targets were normalised.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.hiera import Hiera, HieraBlock, MaskUnitAttention
from torch import Tensor, nn

from .contract import Classifier, PretrainModel
from .layers import check_images_and_mask, init_modules, valid_sizes_message
from .loss import mae_loss, patchify, unpatchify
from .masking import random_mask
from .registry import register_named

__all__ = ["MaskedAutoencoderHiera", "HieraClassifier", "FourDimMaskUnitAttention", "unit_major_to_unrolled",
           "remap_hiera_checkpoint"]


def unit_major_to_unrolled(x: Tensor, levels: int, q_stride: Sequence[int]) -> Tensor:
    """Tokens of K units, (N, K, uh, uw, C), into timm's unrolled order: (N, K*uh*uw, C).

    Row r of a unit is ``sum_j a_j * s**(j-1)`` over the ``levels`` unroll steps (a_1 the finest,
    unrolled first); timm puts (a_1, b_1) outermost, then (a_2, b_2), ..., then the unit.
    Needs ``uh == s_y ** levels`` and ``uw == s_x ** levels``.
    """
    n, k, _, _, c = x.shape
    sy, sx = q_stride
    x = x.reshape(n, k, *([sy] * levels), *([sx] * levels), c)
    perm = [0]
    for j in range(1, levels + 1):           # a_j sits at dim 2 + levels - j, b_j at 2 + 2 * levels - j
        perm += [2 + levels - j, 2 + 2 * levels - j]
    perm += [1, 2 + 2 * levels]
    return x.permute(perm).reshape(n, -1, c)


class FourDimMaskUnitAttention(MaskUnitAttention):
    """timm's ``MaskUnitAttention`` whose mask-unit (windowed) path hands SDPA 4-D tensors.

    timm attends over q/k/v of shape (B, heads, windows, T, head_dim); SDPA's fused GPU kernels take
    4-D inputs only, so that runs the math kernel (materialised attention). Folding the windows into
    the head axis, (B, heads * windows, T, head_dim), is the same attention, each (head, window)
    independent. Same parameters and state dict; the global-attention path is timm's own.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, dim) unrolled tokens -> (B, N / q_stride, dim_out)"""
        if not self.use_mask_unit_attn:
            return super().forward(x)
        b, n, _ = x.shape
        heads, hd = self.heads, self.head_dim
        windows = n // (self.q_stride * self.window_size)
        qkv = self.qkv(x).reshape(b, -1, windows, 3, heads, hd).permute(3, 0, 4, 2, 1, 5)
        q, k, v = qkv.unbind(0)                                        # (B, heads, windows, T, hd)
        if self.q_stride > 1:  # max-pool q over the unrolled stride (timm's Unroll layout)
            q = q.view(b, heads, windows, self.q_stride, -1, hd).amax(dim=3)
        tq, tk = q.shape[3], k.shape[3]
        q = q.reshape(b, heads * windows, tq, hd)
        k, v = (t.reshape(b, heads * windows, tk, hd) for t in (k, v))
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * self.scale) @ k.transpose(-1, -2)).softmax(dim=-1) @ v
        out = out.view(b, heads, windows, tq, hd).transpose(1, 3).reshape(b, -1, self.dim_out)
        return self.proj(out)


def use_four_dim_attention(model: nn.Module) -> None:
    """Give every timm ``MaskUnitAttention`` of ``model`` the 4-D mask-unit path (in place)."""
    for m in model.modules():
        if type(m) is MaskUnitAttention:
            m.__class__ = FourDimMaskUnitAttention


def remap_hiera_checkpoint(sd: dict) -> dict:
    """Keys of the original Hiera repository's checkpoints in timm's layout (timm's mapping):
    ``encoder_norm``/``norm`` -> ``head.norm``, ``head.projection`` -> ``head.fc``."""
    out = {}
    for k, v in sd.items():
        if k.startswith("head.projection."):
            k = "head.fc." + k[len("head.projection."):]
        elif k.startswith("encoder_norm."):
            k = "head.norm." + k[len("encoder_norm."):]
        elif k.startswith("norm."):
            k = "head.norm." + k[len("norm."):]
        out[k] = v
    return out


def _check_layout(img_size: int, stages: Sequence[int], q_pool: int, q_stride: Sequence[int],
                  mask_unit_size: Sequence[int], patch_stride: Sequence[int], what: str) -> int:
    """Validate a Hiera configuration; returns the mask unit in pixels."""
    levels = len(stages) - 1
    if tuple(mask_unit_size) != tuple(s ** levels for s in q_stride):
        raise ValueError(f"{what}: the mask unit {tuple(mask_unit_size)} must be q_stride**{levels} tokens "
                         f"({tuple(s ** levels for s in q_stride)}), the layout timm's masking assumes")
    if not 1 <= q_pool <= levels:
        raise ValueError(f"{what}: q_pool must be in 1..{levels}, got {q_pool}")
    unit = patch_stride[0] * mask_unit_size[0]
    if img_size <= 0 or img_size % unit:
        raise ValueError(valid_sizes_message(img_size, lambda s: s > 0 and s % unit == 0, unit,
                                             f"{what} ({unit}-px mask units)"))
    return unit


class MaskedAutoencoderHiera(Hiera, PretrainModel):
    """Hiera MAE: forward(imgs (N, 3, H, W), mask (N, L) bool True = removed) -> (loss, pred, mask).

    L = (H/32)**2 mask units; every row of ``mask`` must remove ``L - K`` units, K fixed by
    ``mask_ratio`` (a Python int, so nothing syncs with the host to count them). pred is
    (N, L, 32*32*3) in raster unit order. Besides timm's Hiera arguments: the decoder's,
    ``norm_pix_loss``, ``mask_ratio``; ``vis_mask_ratio`` must be 0 (no secondary masking).
    """

    family = "hiera-mae"
    mask_kind = "random"
    default_mask_ratio = 0.6
    supports_secondary_mask = False
    build_options = ("mask_ratio",)

    def __init__(self, img_size: int = 224, in_chans: int = 3, embed_dim: int = 96, num_heads: int = 1,
                 stages: Sequence[int] = (2, 3, 16, 3), q_pool: int = 2, q_stride: Sequence[int] = (2, 2),
                 mask_unit_size: Sequence[int] = (8, 8), mask_unit_attn: Sequence[bool] = (True, True, False, False),
                 patch_kernel: Sequence[int] = (7, 7), patch_stride: Sequence[int] = (4, 4),
                 patch_padding: Sequence[int] = (3, 3), mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 norm_pix_loss: bool = True, vis_mask_ratio: float = 0.0, mask_ratio: float = 0.6) -> None:
        if vis_mask_ratio > 0:
            raise ValueError(f"Hiera MAE has no secondary masking (vis_mask_ratio must be 0, got {vis_mask_ratio})")
        unit = _check_layout(img_size, stages, q_pool, q_stride, mask_unit_size, patch_stride, "Hiera MAE")
        num_units = (img_size // unit) ** 2
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        # Ask the masking module how many units its masks keep, so the two can never disagree.
        num_visible = int((~random_mask(1, num_units, mask_ratio, device="cpu")).sum())
        if num_visible < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no unit of {num_units}")
        super().__init__(img_size=(img_size, img_size), in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads,
                         num_classes=0, stages=tuple(stages), q_pool=q_pool, q_stride=tuple(q_stride),
                         mask_unit_size=tuple(mask_unit_size), mask_unit_attn=tuple(mask_unit_attn),
                         patch_kernel=tuple(patch_kernel), patch_stride=tuple(patch_stride),
                         patch_padding=tuple(patch_padding), mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate)
        self.img_size = img_size
        self.stride = unit                                   # mask unit, pixels
        self.token_size = img_size // unit                   # mask-unit grid side
        self.unit_tokens = mask_unit_size[0]
        self.levels = len(stages) - 1
        self.norm_pix_loss = norm_pix_loss
        self.vis_mask_ratio = 0.0
        self.mask_ratio = mask_ratio
        self.num_visible = num_visible
        final = mask_unit_size[0] // q_stride[0] ** q_pool    # tokens per unit side after the poolings
        self.final_unit = final
        self.pred_stride = unit // final                     # 16 px: one predicted patch per final token
        self.norm_pix_unit = self.pred_stride
        dim_out = self.blocks[-1].dim_out
        # Multi-scale fusion: pooled stages -> the last stage's final x final tokens per unit.
        self.multi_scale_fusion_heads = nn.ModuleList()
        side = mask_unit_size[0]
        for end in self.stage_ends[:q_pool]:
            k = side // final
            self.multi_scale_fusion_heads.append(nn.Conv2d(self.blocks[end].dim_out, dim_out, k, stride=k))
            side //= q_stride[0]
        self.multi_scale_fusion_heads.append(nn.Identity())
        grid = self.token_size * final
        self.decoder_embed = nn.Linear(dim_out, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            HieraBlock(decoder_embed_dim, decoder_embed_dim, decoder_num_heads, mlp_ratio=mlp_ratio,
                       norm_layer=type(self.head.norm)) for _ in range(decoder_depth)])
        self.decoder_norm = type(self.head.norm)(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.pred_stride ** 2 * in_chans)
        self._init_mae_weights()
        use_four_dim_attention(self)

    def _init_mae_weights(self) -> None:
        """As the original: xavier-uniform Linear layers (encoder too), unit LayerNorms, the patch
        embedding initialised like a Linear layer, tokens and decoder positions N(0, 0.02) truncated."""
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        init_modules(self.modules(), conv="keep")
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))

    # ------------------------------------------------------------------ encoder
    def _check_mask(self, mask: Tensor) -> None:
        ok = (mask.sum(1) == mask.shape[1] - self.num_visible).all()
        if mask.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(ok):
                raise ValueError(f"every mask must remove exactly {mask.shape[1] - self.num_visible} of "
                                 f"{mask.shape[1]} units (mask_ratio {self.mask_ratio}); masks with other counts "
                                 f"need a model built with that mask_ratio")
        else:  # no host sync on accelerators
            torch._assert_async(ok, "mask does not remove the number of units mask_ratio fixes")

    def visible_units(self, mask: Tensor) -> Tensor:
        """mask (N, L) -> raster ids of the kept units, increasing: (N, K)."""
        return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, : self.num_visible]

    def embed_visible(self, imgs: Tensor, mask: Tensor, vis: Tensor) -> Tensor:
        """Patch embedding + position of the kept units only: (N, K, u, u, C0), u = 8 tokens.

        timm convolves the image with removed units zeroed; a kept unit's tokens read its own
        pixels plus a halo of ``kernel - stride - padding`` px into its neighbours, so each unit is
        cut out with that halo from the zeroed, padded image and convolved without padding.
        """
        n, c, h, w = imgs.shape
        t, unit = self.token_size, self.stride
        proj = self.patch_embed.proj
        k, s, p = proj.kernel_size[0], proj.stride[0], proj.padding[0]
        keep = (~mask).to(imgs.dtype).view(n, 1, t, 1, t, 1).expand(n, 1, t, unit, t, unit).reshape(n, 1, h, w)
        padded = F.pad(imgs * keep, (p, p, p, p))
        crop = unit - s + k
        dev = imgs.device
        ar = torch.arange(crop, device=dev)
        rows = ((vis // t) * unit).view(n, -1, 1, 1) + ar.view(1, 1, crop, 1)
        cols = ((vis % t) * unit).view(n, -1, 1, 1) + ar.view(1, 1, 1, crop)
        cut = padded[torch.arange(n, device=dev).view(n, 1, 1, 1), :, rows, cols]     # (N, K, crop, crop, C)
        x = F.conv2d(cut.flatten(0, 1).permute(0, 3, 1, 2), proj.weight, proj.bias, stride=s)
        u = self.unit_tokens
        x = x.view(n, -1, x.shape[1], u, u).permute(0, 1, 3, 4, 2)                     # (N, K, u, u, C0)
        pos = self.pos_embed.to(x.dtype).view(t, u, t, u, -1).permute(0, 2, 1, 3, 4).reshape(t * t, u, u, -1)
        return x + pos[vis]

    def forward_encoder(self, imgs: Tensor, mask: Tensor, return_intermediates: bool = False):
        """imgs (N, 3, H, W); mask (N, L) bool, True = removed.

        Returns latent (N, K, f, f, C_last) (fused, normalised; f = 2 final tokens per unit side),
        the kept unit ids vis (N, K) in raster order, and optionally a dict with ``stages``: each
        stage's output per kept unit, (N, K, h_s, w_s, C_s), and ``tokens``: the last block's output
        in timm's unrolled order.
        """
        check_images_and_mask(self, imgs, mask)
        mask = mask.bool()
        self._check_mask(mask)
        vis = self.visible_units(mask)
        x = unit_major_to_unrolled(self.embed_visible(imgs, mask, vis), self.levels, self.q_stride)
        stages = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.stage_ends:
                stages.append(self.reroll(x, i, mask=mask))                         # (N, K, h, w, C)
        used = stages[: self.q_pool] + stages[-1:]   # the stages after the last pooling share its resolution
        fused = 0
        for head, y in zip(self.multi_scale_fusion_heads, used):
            if not isinstance(head, nn.Identity):
                n, k, hh, ww, c = y.shape
                y = head(y.reshape(n * k, hh, ww, c).permute(0, 3, 1, 2))
                y = y.permute(0, 2, 3, 1).reshape(n, k, *y.shape[2:], y.shape[1])
            fused = fused + y
        latent = self.head.norm(fused)
        if return_intermediates:
            return latent, vis, {"stages": stages, "tokens": x}
        return latent, vis

    # ------------------------------------------------------------------ decoder
    def forward_decoder(self, latent: Tensor, vis: Tensor) -> Tensor:
        """latent (N, K, f, f, C), vis (N, K) -> pred (N, G*G, 16*16*3) on the final G x G token grid
        (G = 14 at 224 px), raster order; each vector is (channel, row, column) as the original's."""
        x = self.decoder_embed(latent)
        n, k, f, _, d = x.shape
        t = self.token_size
        full = self.mask_token.to(x.dtype).view(1, 1, 1, 1, d).expand(n, t * t, f, f, d)
        full = full.scatter(1, vis.view(n, k, 1, 1, 1).expand(-1, -1, f, f, d), x)
        tokens = full.view(n, t, t, f, f, d).permute(0, 1, 3, 2, 4, 5).reshape(n, t * f * t * f, d)
        tokens = tokens + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            tokens = blk(tokens)
        return self.decoder_pred(self.decoder_norm(tokens))

    def patch_mask(self, mask: Tensor) -> Tensor:
        """Unit mask (N, T*T) -> mask of the final tokens (N, (T*f)**2), raster order."""
        n, t, f = mask.shape[0], self.token_size, self.final_unit
        return mask.view(n, t, 1, t, 1).expand(n, t, f, t, f).reshape(n, -1)

    def forward(self, imgs: Tensor, mask: Tensor, sm_mask: Optional[Tensor] = None):
        """Returns (loss, pred (N, L, 32*32*3) raster unit order, mask (N, L))."""
        if sm_mask is not None:
            raise ValueError("Hiera MAE has no secondary masking: call forward(imgs, mask)")
        mask = mask.bool()
        latent, vis = self.forward_encoder(imgs, mask)
        raw = self.forward_decoder(latent, vis)
        n, length, _ = raw.shape
        p, c = self.pred_stride, imgs.shape[1]
        pred = raw.view(n, length, c, p, p).permute(0, 1, 3, 4, 2).reshape(n, length, p * p * c)
        loss = mae_loss(pred, imgs, self.patch_mask(mask), p, self.norm_pix_loss)
        return loss, patchify(unpatchify(pred, p, c), self.stride), mask


class HieraClassifier(Hiera, Classifier):
    """timm ``Hiera`` with the layer ids of the layer-wise lr decay: 0 for ``patch_embed.*`` and
    ``pos_embed``, i + 1 for ``blocks.i.*``, ``len(blocks) + 1`` for the head (norm and fc)."""

    def __init__(self, img_size: int = 224, **kwargs) -> None:
        stages = kwargs.get("stages", (2, 3, 16, 3))
        _check_layout(img_size, stages, kwargs.get("q_pool", 3), kwargs.get("q_stride", (2, 2)),
                      kwargs.get("mask_unit_size", (8, 8)), kwargs.get("patch_stride", (4, 4)), "Hiera")
        super().__init__(img_size=(img_size, img_size), **kwargs)
        self.img_size = img_size
        use_four_dim_attention(self)

    family = "hiera"

    def lrd_num_layers(self) -> int:
        return len(self.blocks) + 1

    def lrd_layer_id(self, param_name: str) -> int:
        if param_name.startswith(("patch_embed.", "pos_embed")):
            return 0
        if param_name.startswith("blocks."):
            return int(param_name.split(".")[1]) + 1
        return self.lrd_num_layers()

    def checkpoint_filter(self, sd: dict) -> dict:
        """util.pretrained asks this: the original repository's key names in timm's layout."""
        return remap_hiera_checkpoint(sd)


# ---------------------------------------------------------------- factories

# timm's hiera_*_224 configurations; MAE pretraining pools q only twice (q_pool=2, final 14x14 tokens),
# the classifiers three times (timm's default).
_SIZES = {
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2)),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2)),
    "base": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
    "base_plus": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3)),
    "large": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4)),
}
_PICO = dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1))


def _pretrain_builder(cfg: dict, **defaults):
    def build(**kwargs) -> MaskedAutoencoderHiera:
        return MaskedAutoencoderHiera(**{**cfg, "q_pool": 2, **defaults, **kwargs})
    return build


def _classifier_builder(cfg: dict, **defaults):
    def build(**kwargs) -> HieraClassifier:
        return HieraClassifier(**{**cfg, **defaults, **kwargs})
    return build


for _size, _cfg in _SIZES.items():
    register_named(f"mae_hiera_{_size}_224", _pretrain_builder(_cfg),
                   f"Hiera-{_size} MAE, 224 px, 32-px mask units, 8-block 512-d decoder.",
                   task="pretrain", namespace=globals(), classifier=f"hiera_{_size}_224")
    register_named(f"hiera_{_size}_224", _classifier_builder(_cfg),
                   f"timm Hiera-{_size} classifier, 224 px (Hiera MAE fine-tuning).",
                   task="classify", namespace=globals())
register_named("mae_hiera_pico_128", _pretrain_builder(_PICO, img_size=128, decoder_embed_dim=32, decoder_depth=1,
                                                       decoder_num_heads=2),
               "Tiny Hiera MAE for tests and demos (128 px, 4x4 mask units).", task="pretrain", namespace=globals(),
               classifier="hiera_pico_128")
register_named("hiera_pico_128", _classifier_builder(_PICO, img_size=128),
               "Tiny timm Hiera classifier (tests; loads the pico Hiera MAE encoder).", task="classify",
               namespace=globals())
# 32-px variants for the animal-mnist experiment (FINETUNE.md): patch stride 1, three stages, 4x4-token
# mask units = 4-px units, 8x8 of them per image (the other methods' 32-px arms have the same grid).
_PICO_32 = dict(embed_dim=16, num_heads=1, stages=(1, 1, 1), q_pool=2, mask_unit_size=(4, 4),
                mask_unit_attn=(True, True, False), patch_kernel=(3, 3), patch_stride=(1, 1), patch_padding=(1, 1))
register_named("mae_hiera_pico_p1_32", _pretrain_builder(_PICO_32, img_size=32, decoder_embed_dim=32, decoder_depth=1,
                                                         decoder_num_heads=2),
               "Tiny Hiera MAE for 32-px images: patch stride 1, 4-px mask units (8x8); finetunes into "
               "hiera_pico_p1_32.", task="pretrain", namespace=globals(), classifier="hiera_pico_p1_32")
register_named("hiera_pico_p1_32", _classifier_builder(_PICO_32, img_size=32),
               "Tiny timm Hiera classifier for 32-px images (loads mae_hiera_pico_p1_32).", task="classify",
               namespace=globals())
