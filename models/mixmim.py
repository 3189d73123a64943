"""MixMAE (MixMIM, arXiv 2205.13137) pretraining for Swin, and its finetuning classifiers.

Instead of replacing hidden units by [MASK] tokens, MixMAE fills them with the
units of another image and reconstructs *both* images from the one mixed input:

1. **Pairing.** Image n is mixed with image ``N-1-n`` of the same batch (the
   batch flipped along dim 0).
2. **Mixing.** On the mask-unit grid (the stride of the last stage: 32-px units,
   ``token_size = img_size // 32`` per side, for the original's patch 4 and four
   stages), the mask ``m`` says which units of mixed sample n come from the
   partner. The mixing is done on the patch embeddings (equivalent to mixing
   pixels: the patch embedding is per patch); then a frozen 2-D sin-cos absolute
   position embedding (``pos_embed``) is added.
3. **Encoder.** Swin without shifted windows (windows 14/14/14/7 at 224 px; a
   map no larger than its window is one global window). In every window and
   every stage, each token attends only to tokens of its own source image
   (boolean "same image" mask folded into the relative-position bias as -inf,
   through ``scaled_dot_product_attention``). The units are aligned with every
   2x2 patch merge, so merging never mixes the two images either: the output of
   image n's tokens depends on image n's pixels only.
4. **Unmixing.** The latent (N, L, C) is projected to the 512-d decoder and
   split into 2N full-length sequences: sequence n keeps mixed sample n's own
   tokens and puts the ``mask_token`` where the partner was; sequence N+n keeps
   the partner's tokens and puts the mask token elsewhere. An 8-block ViT
   decoder with a fixed sin-cos position reconstructs each unit's pixels
   (32x32x3 for 32-px units).
5. **Dual reconstruction.** Image n's hidden units (``m[n]``) are predicted
   by sequence n; its other units were hidden in mixed sample ``N-1-n`` and are
   predicted by sequence ``N + (N-1-n)``. Put together, ``pred[n]`` is a
   complete reconstruction of image n where every unit is predicted from a
   mixed image in which it was hidden. Loss: (norm-pix) MSE averaged over all
   units of all images (the original's single mean over both halves).

Masks. main_pretrain draws an independent random mask per sample
(``models.masking.random_mask``). Complementary reconstruction needs both
members of a pair to share their mask, so **the pair (n, N-1-n) uses the mask
row ``min(n, N-1-n)``** (the rows of the second half are ignored) and
``forward`` returns the mask actually used. The original draws one mask per
batch; when all rows are equal this model is exactly that, and otherwise every
pair gets its own random mask (more diversity, same algorithm).

Mask semantics (the ``mask`` returned by ``forward``): ``mask[n, u] = True``
means unit u of mixed sample n was taken from the partner, i.e. image n's unit
u was *hidden* in the input that carried image n; those are the units a
reconstruction figure should show as hidden (read this returned mask, not the
drawn one: rows of the second half differ). ``pred[n]`` covers every unit of image n.

Odd batches: the middle sample is paired with itself. Its "mixed" input is the
image itself, but the attention mask still splits it into the two label groups
(m and not-m), which never see each other, so it becomes two complementary
MAE tasks without any leakage; it counts in the loss like any other sample.

Cost. The encoder runs on every token of the mixed image (no token is wasted on
[MASK]). Because masks are per pair, each block builds its additive attention
mask per window and head, (N*nW, heads, n, n), the size of the attention logits
(at 224 px, batch 128, bf16: about 0.63 GB per stage-1 block, 0.16 GB per
stage-3 block, kept for backward). The decoder sees 2N sequences of L tokens.

Classifiers (``MixMIMClassifier``): ``mixmim_{base,large,huge}_cls`` at 224 px,
``mixmim_{base,large}_384_cls`` (windows 16/16/24/12) and ``mixmim_pico_cls`` for
tests. The same encoder (frozen sin-cos ``pos_embed`` kept), token-wise final
``norm``, global average pool, ``head``; a pretraining checkpoint loads with only
``head.*`` missing (the decoder and ``mask_token`` unexpected).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .contract import Classifier, PretrainModel
from .layers import drop_path_rates, init_modules, valid_sizes_message
from .loss import patchify, unit_stats
from .pos_embed import sincos_2d
from .registry import register_named

__all__ = ["MixMIMEncoder", "MixMIMPretrain", "MixMIMClassifier", "pair_masks", "unit_labels",
           "unmix_tokens", "merge_reconstructions", "mixmim_loss", "mixmim_sizes_ok"]

PATCH = 4  # the original's patch; with 4 stages its mask unit (the last stage's stride) is 32 px


# ------------------------------------------------------------------ helpers

def mixmim_sizes_ok(img_size: int, window_sizes: Sequence[int], patch_size: int = PATCH) -> bool:
    """Whether a square input works: whole mask units, and at every stage the
    token map is either no larger than the window (one global window) or a
    multiple of it."""
    if img_size <= 0 or img_size % unit_px(patch_size, len(window_sizes)):
        return False
    g = img_size // patch_size
    return all((g >> s) <= ws or (g >> s) % ws == 0 for s, ws in enumerate(window_sizes))


def unit_px(patch_size: int, num_stages: int) -> int:
    """The mask unit in px: the stride of the last stage (patch x 2**(stages-1))."""
    return patch_size * 2 ** (num_stages - 1)


def effective_windows(img_size: int, window_sizes: Sequence[int], patch_size: int = PATCH) -> list[int]:
    """Per-stage window side after clamping to the map (Swin's rule)."""
    g = img_size // patch_size
    return [min(ws, g >> s) for s, ws in enumerate(window_sizes)]


def pair_masks(mask: Tensor) -> Tensor:
    """The mask each pair (n, N-1-n) shares: row ``min(n, N-1-n)``.

    mask: (N, L) bool -> (N, L) bool with ``out[n] == out[N-1-n]``.
    """
    n = mask.shape[0]
    idx = torch.arange(n, device=mask.device)
    return mask[torch.minimum(idx, n - 1 - idx)]


def unit_labels(mask: Tensor, token_size: int, k: int) -> Tensor:
    """Upsample the unit mask to a token map (nearest): (N, T*T) -> (N, T*k, T*k)."""
    n, t = mask.shape[0], token_size
    return mask.reshape(n, t, 1, t, 1).expand(n, t, k, t, k).reshape(n, t * k, t * k)


def window_partition(x: Tensor, ws: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C), windows in raster order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_merge(x: Tensor, ws: int, b: int, h: int, w: int) -> Tensor:
    """(B * nW, ws * ws, C) -> (B, H, W, C), the inverse of ``window_partition``."""
    c = x.shape[-1]
    x = x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_index(ws: int, device=None) -> Tensor:
    """Row of the (2ws-1)^2 relative-position table for every (query, key) pair of a window: (n, n)."""
    r = torch.arange(ws, device=device)
    rows, cols = torch.meshgrid(r, r, indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    dr = rows[:, None] - rows[None, :] + ws - 1
    dc = cols[:, None] - cols[None, :] + ws - 1
    return dr * (2 * ws - 1) + dc


def unmix_tokens(z: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """Split mixed latents into the two images' full-length decoder sequences.

    z: (N, L, D) decoder-embedded latent of the mixed samples; mask: (N, L) bool,
    True = token from the partner; mask_token: (1, 1, D).
    Returns (2N, L, D): rows 0..N-1 keep each sample's own tokens (mask token where
    the partner was), rows N..2N-1 keep the partner's tokens (mask token elsewhere).
    """
    m = mask.unsqueeze(-1)
    tok = mask_token.to(z.dtype)
    return torch.cat([torch.where(m, tok, z), torch.where(m, z, tok)], dim=0)


def merge_reconstructions(rec: Tensor, mask: Tensor) -> Tensor:
    """Assemble each image from its two complementary reconstructions.

    rec: (2N, L, P) decoder outputs of ``unmix_tokens``'s sequences; mask: (N, L) pair-shared.
    Row n predicts image n at its ``mask[n]`` units; row N+j predicts image N-1-j at its
    ``~mask[j]`` units, so the flipped second half lines up with the images.
    Returns (N, L, P): image n's reconstruction at every unit, raster order.
    """
    n = mask.shape[0]
    return torch.where(mask.unsqueeze(-1), rec[:n], rec[n:].flip(0))


def mixmim_loss(pred: Tensor, imgs: Tensor, unit: int, norm_pix_loss: bool) -> Tensor:
    """MSE over every unit of every image (both reconstructions at once).

    pred: (N, L, unit*unit*3) raster order; imgs: (N, 3, H, W).
    """
    target = patchify(imgs, unit)
    if norm_pix_loss:
        mean, std = unit_stats(target)
        target = (target - mean) / std
    return (pred - target).pow(2).mean()


# ------------------------------------------------------------------ encoder

class MixWindowAttention(nn.Module):
    """Window attention with Swin's relative-position table and an optional same-image mask."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # non-persistent: the original drops the index when loading, so its checkpoints lack it
        self.register_buffer("relative_position_index", relative_index(window_size), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """(heads, n, n8) bias of every (query, key) pair of a window, gathered from the float32 table
        and then cast to ``dtype``; rows padded to n8 = n rounded up to 8 (columns >= n are filler),
        so that ``[..., :n]`` is a mask the memory-efficient kernel takes without a copy."""
        n = self.window_size ** 2
        n8 = -(-n // 8) * 8
        index = F.pad(self.relative_position_index, (0, n8 - n)) if n8 != n else self.relative_position_index
        bias = self.relative_position_bias_table.t().index_select(1, index.reshape(-1))
        return bias.view(self.num_heads, n, n8).to(dtype or bias.dtype)

    def forward(self, x: Tensor, same: Optional[Tensor] = None) -> Tensor:
        """x: (B*nW, n, C); same: (B*nW, 1, n, n8) bool (``MixStage.same_image``), True = same source
        image, or None.

        Returns (B*nW, n, C).
        """
        bw, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.position_bias(q.dtype).unsqueeze(0)                         # (1, heads, n, n8)
        if same is not None:
            # every row keeps at least its own token, so -inf never empties a row
            bias = torch.where(same, bias, float("-inf"))                       # (B*nW, heads, n, n8)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[..., :n])  # (B*nW, heads, n, C/heads)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class MixBlock(nn.Module):
    """Pre-norm (non-shifted) window attention + MLP."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MixWindowAttention(dim, num_heads, window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, same: Optional[Tensor] = None) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C); same: see ``MixWindowAttention``."""
        b, h, w, _ = x.shape
        ws = self.window_size
        y = self.attn(window_partition(self.norm1(x), ws), same)
        x = x + self.drop_path(window_merge(y, ws, b, h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MixStage(nn.Module):
    """One Swin stage: blocks, then (stages 1-3) patch merging to the next stage."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_paths: Sequence[float], downsample: bool) -> None:
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList([MixBlock(dim, num_heads, window_size, mlp_ratio, drop_paths[i])
                                     for i in range(depth)])
        self.downsample = PatchMerging(dim, 2 * dim) if downsample else None

    def same_image(self, labels: Tensor) -> Tensor:
        """labels: (B, H, W) bool source label -> (B*nW, 1, n, n8) bool, True = same source; rows
        padded to n8 = n rounded up to 8 with False (``MixWindowAttention.position_bias``)."""
        lw = window_partition(labels.unsqueeze(-1), self.window_size).squeeze(-1)   # (B*nW, n)
        same = (lw.unsqueeze(-1) == lw.unsqueeze(-2)).unsqueeze(1)
        n = same.shape[-1]
        return F.pad(same, (0, -(-n // 8) * 8 - n), value=False)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """x: (B, H, W, C); labels: (B, H, W) bool or None -> (B, H', W', C') after the merge."""
        same = self.same_image(labels) if labels is not None else None
        for blk in self.blocks:
            x = blk(x, same)
        return self.downsample(x) if self.downsample is not None else x


class MixMIMEncoder(nn.Module):
    """Patch embedding + frozen sin-cos position + non-shifted Swin stages (4 in the original) + final norm.

    Keys: ``patch_embed.*``, ``pos_embed`` (frozen), ``layers.{s}.blocks.{i}.*``,
    ``layers.{s}.downsample.*`` (all but the last stage), ``norm.*``. The mask unit is the last
    stage's stride, so a 32-px input with patch 1 and three stages has 8x8 units of 4 px.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, embed_dim: int = 128,
                 depths: Sequence[int] = (2, 2, 18, 2), num_heads: Sequence[int] = (4, 8, 16, 32),
                 window_sizes: Sequence[int] = (14, 14, 14, 7), mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, patch_size: int = PATCH, what: str = "MixMIM Swin") -> None:
        super().__init__()
        n_stages = len(depths)
        if not (n_stages == len(num_heads) == len(window_sizes) >= 1):
            raise ValueError(f"depths, num_heads and window_sizes need one entry per stage, got "
                             f"{len(depths)}/{len(num_heads)}/{len(window_sizes)}")
        unit = unit_px(patch_size, n_stages)
        ok = lambda s: mixmim_sizes_ok(s, window_sizes, patch_size)  # noqa: E731
        if not ok(img_size):
            raise ValueError(valid_sizes_message(img_size, ok, unit, f"{what} (windows {list(window_sizes)})"))
        self.img_size = img_size
        self.patch_size = patch_size
        self.stride = unit
        self.token_size = img_size // unit
        self.depths = tuple(depths)
        self.window_sizes = effective_windows(img_size, window_sizes, patch_size)
        self.stage_dims = [embed_dim * 2 ** s for s in range(n_stages)]
        self.num_features = self.stage_dims[-1]
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm,
                                      output_fmt="NHWC")
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid), requires_grad=False)   # (1, G*G, C)
        dpr = drop_path_rates(depths, drop_path_rate)
        starts = [sum(depths[:s]) for s in range(n_stages)]
        self.layers = nn.ModuleList([
            MixStage(self.stage_dims[s], depths[s], num_heads[s], self.window_sizes[s], mlp_ratio,
                     dpr[starts[s]:starts[s] + depths[s]], downsample=s < n_stages - 1) for s in range(n_stages)])
        self.norm = nn.LayerNorm(self.num_features)

    def _init_weights(self) -> None:
        """The original's initialisation, pretraining and finetuning models alike: every Linear
        xavier-uniform with zero bias (encoder included), LayerNorm 1/0, the patch-embedding
        convolution left at PyTorch's default; the relative-position tables (trunc-normal 0.02) and
        ``mask_token`` (normal 0.02) are drawn where they are built."""
        init_modules(self.modules(), conv="keep")

    def _check_imgs(self, imgs: Tensor) -> None:
        if imgs.dim() != 4 or tuple(imgs.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"{type(self).__name__} built for {self.img_size}-px inputs got images of shape "
                             f"{tuple(imgs.shape)}")

    def embed(self, imgs: Tensor) -> Tensor:
        """imgs (N, 3, H, W) -> patch tokens (N, H/p, W/p, C), before the position embedding."""
        return self.patch_embed(imgs)

    def add_pos(self, x: Tensor) -> Tensor:
        return x + self.pos_embed.to(x.dtype).view(1, x.shape[1], x.shape[2], -1)

    def encode(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (N, H/p, W/p, C) positioned tokens; mask: (N, T*T) bool source label per unit, or None.

        Returns the normalised final tokens (N, T*T, C_last), raster order (one per mask unit).
        """
        t = self.token_size
        for stage in self.layers:
            labels = unit_labels(mask, t, x.shape[1] // t) if mask is not None else None
            x = stage(x, labels)
        return self.norm(x.flatten(1, 2))


# ------------------------------------------------------------------ pretraining

class MixMIMPretrain(MixMIMEncoder, PretrainModel):
    """MixMAE autoencoder (see the module docstring). Pretraining contract of main_pretrain.py.

    forward(imgs (N, 3, H, W), mask (N, L) bool, sm_mask=None) -> (loss, pred (N, L, u*u*3), mask_used (N, L)),
    u = ``stride`` (32 px in the original).
    """

    family = "mixmae"
    mask_kind = "random"
    mask_note = "grey = hidden: taken from the partner image in this image's mixed input"
    mask_rounding = "remove"   # int(L * r) units come from the partner, as the original (24 of 49 at 0.5)
    default_mask_ratio = 0.5
    supports_secondary_mask = False
    images_per_sample = 1  # N source images in, N reconstructed images out (each mixed input also reconstructs its partner)

    def __init__(self, img_size: int = 224, in_chans: int = 3, embed_dim: int = 128,
                 depths: Sequence[int] = (2, 2, 18, 2), num_heads: Sequence[int] = (4, 8, 16, 32),
                 window_sizes: Sequence[int] = (14, 14, 14, 7), mlp_ratio: float = 4.0,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 decoder_mlp_ratio: float = 4.0, norm_pix_loss: bool = False, vis_mask_ratio: float = 0.0,
                 drop_path_rate: float = 0.0, patch_size: int = PATCH) -> None:
        if vis_mask_ratio > 0:
            raise ValueError(f"MixMAE has no secondary masking: vis_mask_ratio must be 0 (got {vis_mask_ratio})")
        super().__init__(img_size, in_chans, embed_dim, depths, num_heads, window_sizes, mlp_ratio,
                         drop_path_rate, patch_size, what="MixMAE Swin")
        self.norm_pix_loss = norm_pix_loss
        self.vis_mask_ratio = 0.0
        self.decoder_embed = nn.Linear(self.num_features, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_embed_dim, self.token_size), requires_grad=False)
        # norm_layer=nn.LayerNorm: PyTorch's eps 1e-5 like every LayerNorm here (timm's Block defaults to 1e-6)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.stride ** 2 * in_chans)
        self._init_weights()
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        # informative only: main_pretrain decays the 3-D mask token and the tables, as the original
        return {"pos_embed", "decoder_pos_embed"}

    def _check_inputs(self, imgs: Tensor, mask: Tensor) -> None:
        self._check_imgs(imgs)
        if mask.shape != (imgs.shape[0], self.token_size ** 2):
            raise ValueError(f"mask must be (N, {self.token_size ** 2}) for {self.token_size}x{self.token_size} "
                             f"{self.stride}-px units, got {tuple(mask.shape)}")

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """imgs: (N, 3, H, W); mask: (N, L) bool pair-shared (``pair_masks``), True = unit from the partner.

        Returns the latent of the mixed samples (N, L, C_last), raster order.
        """
        x = self.embed(imgs)                                                      # (N, G, G, C)
        lab = unit_labels(mask, self.token_size, x.shape[1] // self.token_size)   # (N, G, G)
        x = torch.where(lab.unsqueeze(-1), x.flip(0), x)                          # mix with the flipped batch
        return self.encode(self.add_pos(x), mask)

    def forward_decoder(self, latent: Tensor, mask: Tensor, return_both: bool = False):
        """latent: (N, L, C_last); mask: (N, L) pair-shared.

        Returns pred (N, L, u*u*3): image n's reconstruction at every unit (and, with
        ``return_both``, the raw (2N, L, P) outputs of the two unmixed sequences).
        """
        x = unmix_tokens(self.decoder_embed(latent), mask, self.mask_token)       # (2N, L, D)
        x = x + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        rec = self.decoder_pred(self.decoder_norm(x))                             # (2N, L, P)
        pred = merge_reconstructions(rec, mask)
        return (pred, rec) if return_both else pred

    def forward(self, imgs: Tensor, mask: Tensor, sm_mask: Optional[Tensor] = None):
        """imgs: (N, 3, H, W); mask: (N, L) bool from ``random_mask`` (ratio 0.5).

        The pair (n, N-1-n) uses mask row min(n, N-1-n). Returns (loss, pred (N, L, u*u*3)
        raster order, the pair-shared mask actually used (N, L): True = image n's unit
        was replaced by the partner's in image n's mixed input).
        """
        if sm_mask is not None:
            raise ValueError("MixMAE has no secondary masking (sm_mask must be None)")
        self._check_inputs(imgs, mask)
        m = pair_masks(mask.bool())
        latent = self.forward_encoder(imgs, m)
        pred = self.forward_decoder(latent, m)
        loss = mixmim_loss(pred, imgs, self.stride, self.norm_pix_loss)
        return loss, pred, m


# ------------------------------------------------------------------ finetuning

class MixMIMClassifier(MixMIMEncoder, Classifier):
    """The finetuning model: MixMIM encoder (no mixing) -> token-wise ``norm`` -> average pool -> ``head``.

    imgs: (N, 3, H, W) -> logits (N, num_classes). Encoder keys equal the pretraining model's.
    """

    family = "mixmim"

    def __init__(self, img_size: int = 224, num_classes: int = 1000, global_pool: bool = True,
                 **kwargs) -> None:
        if not global_pool:  # the reference's constructors take the flag; average pooling is the only head
            raise ValueError("MixMIM classifiers pool by averaging the last stage's tokens (global_pool=True)")
        super().__init__(img_size=img_size, **kwargs)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def forward_features(self, imgs: Tensor) -> Tensor:
        """imgs -> normalised final tokens (N, T*T, C_last)."""
        self._check_imgs(imgs)
        return self.encode(self.add_pos(self.embed(imgs)))

    def forward_pyramid(self, imgs: Tensor) -> list[Tensor]:
        """The stage outputs for dense prediction: [(N, C_s, H/p/2**s, W/p/2**s)]."""
        self._check_imgs(imgs)
        x = self.add_pos(self.embed(imgs))
        outs = []
        for stage in self.layers:
            for blk in stage.blocks:
                x = blk(x)
            outs.append(x.permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)
        return outs

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(imgs))

    def no_weight_decay(self) -> set[str]:
        """Only the frozen position table: the original decays the relative-position tables in
        finetuning (its ``no_weight_decay()`` is empty; 1-D tensors are exempt by their shape)."""
        return {"pos_embed"}

    # layer-wise lr decay, the original's rule
    def lrd_num_layers(self) -> int:
        return sum(self.depths) + 1

    def lrd_layer_id(self, param_name: str) -> int:
        """``patch_embed`` / ``pos_embed`` -> 0; block j, counted over all stages from 0, -> j + 1;
        the patch merging at the end of stage s -> the id of stage s+1's first block; everything
        else (``norm``, ``head``) -> ``sum(depths)``. With ``lrd_num_layers() = sum(depths) + 1``
        and scale = decay ** (num_layers - id), the head trains at ``decay`` x lr, not 1.0x: the
        original's quirk, reproduced (depths 2/2/18/2: blocks 1..24, head 24, num_layers 25)."""
        if param_name.startswith(("patch_embed", "pos_embed")):
            return 0
        if param_name.startswith("layers."):
            parts = param_name.split(".")
            s = int(parts[1])
            if parts[2] == "blocks":
                return sum(self.depths[:s]) + int(parts[3]) + 1
            if parts[2] == "downsample":
                return sum(self.depths[:s + 1]) + 1
        return sum(self.depths)


# ------------------------------------------------------------------ factories

_SIZES = {
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88)),
    # tests and demos: under a million parameters, 128 px (4x4 units), windows 8/8/8/4
    # (16 and 4 windows at stages 1-2, global at stages 3-4, as Swin-B/W14 at 224)
    "pico": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_sizes=(8, 8, 8, 4),
                 img_size=128),
}
_PICO_DECODER = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


def _register_pretrain(size: str, doc: str) -> None:
    def build(**kwargs) -> MixMIMPretrain:
        return MixMIMPretrain(**{**_SIZES[size], **(_PICO_DECODER if size == "pico" else {}), **kwargs})
    register_named(f"mixmim_{size}", build, doc, task="pretrain", namespace=globals(),
                   classifier=f"mixmim_{size}_cls")


def _register_classifier(name: str, size: str, doc: str, **extra) -> None:
    def build(**kwargs) -> MixMIMClassifier:
        return MixMIMClassifier(**{**_SIZES[size], **extra, **kwargs})
    register_named(name, build, doc, task="classify", namespace=globals())


_AT_384 = dict(img_size=384, window_sizes=(16, 16, 24, 12))   # resize the tables when loading a 224 checkpoint
_register_pretrain("base", "MixMAE Swin-B/W14 (embed 128, depths 2/2/18/2), 224 px, 8-block 512-d decoder.")
_register_pretrain("large", "MixMAE Swin-L/W14 (embed 192), 224 px, 8-block 512-d decoder.")
_register_pretrain("huge", "MixMAE Swin-H/W14 (embed 352, heads 11/22/44/88), 224 px, 8-block 512-d decoder.")
_register_pretrain("pico", "Tiny MixMAE for tests and demos: 128 px, windows 8/8/8/4, 1-block 64-d decoder.")
_register_classifier("mixmim_base_cls", "base", "MixMIM-B classifier (finetunes mixmim_base), 224 px, windows 14/14/14/7.")
_register_classifier("mixmim_base_384_cls", "base", "MixMIM-B classifier at 384 px, windows 16/16/24/12.", **_AT_384)
_register_classifier("mixmim_large_cls", "large", "MixMIM-L classifier (finetunes mixmim_large), 224 px.")
_register_classifier("mixmim_large_384_cls", "large", "MixMIM-L classifier at 384 px, windows 16/16/24/12.", **_AT_384)
_register_classifier("mixmim_huge_cls", "huge", "MixMIM-H classifier (finetunes mixmim_huge), 224 px.")
_register_classifier("mixmim_pico_cls", "pico", "Tiny classifier that finetunes mixmim_pico (128 px, windows 8/8/8/4).")
# 32-px variant of the animal-mnist experiment (FINETUNE.md). The mask unit is the last stage's stride,
# so three stages at patch 1 give 4-px units, 8x8 per image (four stages would give 4x4); windows 8/8/8
# are 16 and 4 windows at stages 1-2 and one global window at stage 3, as the pico's 8/8/8/4 at 128 px.
_PICO3_P1_32 = dict(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_sizes=(8, 8, 8), img_size=32,
                    patch_size=1)
register_named("mixmim_pico3_p1_32", lambda **kw: MixMIMPretrain(**{**_PICO3_P1_32, **_PICO_DECODER, **kw}),
               "Tiny 3-stage MixMAE for 32-px images (patch 1, 4-px units, 8x8), 1-block 64-d decoder.",
               task="pretrain", namespace=globals(), classifier="mixmim_pico3_p1_32_cls")
register_named("mixmim_pico3_p1_32_cls", lambda **kw: MixMIMClassifier(**{**_PICO3_P1_32, **kw}),
               "Tiny 3-stage MixMIM classifier for 32-px images (finetunes mixmim_pico3_p1_32).", task="classify",
               namespace=globals())
