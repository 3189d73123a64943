"""GreenMIM (arXiv 2205.13515): masked autoencoding for Swin on the visible tokens only.

The encoder is a standard Swin (timm's ``SwinTransformer``: relative position bias table,
linear patch merging, the same parameter names), run on the visible tokens alone:

1. Random masking of 32-px units (8x8 patch-4 tokens); every mask of a batch hides the same
   number of units. Each sample has its own mask by default; ``shared_mask=True`` uses the
   first row for the whole batch, as the original does.
2. Only the visible units are patch-embedded. Tokens are kept *unit-major*: ``(N, K, u, u, C)``
   for K visible units of ``u x u`` tokens (u = 8, 4, 2, 1 over the stages), units in raster
   order. A kept unit stays whole through every stage, so patch merging is a reshape of each
   unit's 2x2 blocks, concatenated in Swin's order (TL, BL, TR, BR), then LayerNorm + Linear.
3. Window attention becomes *group* window attention. The window of every visible token is
   computed arithmetically from its true coordinates, for plain and shifted windows (a
   shifted window is the region Swin's roll + mask would form; no dense map, no roll). The
   windows are packed into G equal groups of g slots by ``models.grouping.plan_groups``,
   which minimises the attention cost (padding included) over g and the packing. The result
   is the proven least-cost grouping when the plan is ``certified`` (always with at most 12
   windows, where an exact search runs when best-fit decreasing misses the lower bound);
   above 12 windows an uncertified plan is a heuristic (best-fit decreasing) that can cost
   more than the optimum. With per-sample masks the windows of the whole batch are packed
   together. Attention runs as one ``scaled_dot_product_attention`` call
   with an additive block-diagonal mask: a token sees only tokens of its own window, with the
   relative position bias looked up from true coordinates; padding slots see only themselves.
   Norms, MLPs and the q/k/v/output projections run on the unpacked visible tokens.
4. A one-block 512-d ViT decoder gets every latent at its *true* unit (the original placed
   the visible latents at permuted positions), mask tokens elsewhere, plus fixed
   sin-cos positions, and predicts 32x32x3 pixels per unit; norm-pix MSE on masked units.

Planning a batch costs one device-to-host copy (the window-size histograms of every stage
and shift, a few hundred integers); the packing itself works on those histograms, so its
time does not grow with the batch size.

The encoder state dict has exactly timm's keys (``patch_embed.*``, ``layers.*``, ``norm.*``), so a
pretrained checkpoint loads into ``timm.models.swin_transformer.SwinTransformer`` (and the
classifiers of models/swin_timm.py) with only ``head.fc.*`` missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from .contract import PretrainModel
from .grouping import GroupPlan, plan_groups
from .layers import check_images_and_mask, init_modules, valid_sizes_message
from .loss import mae_loss
from .mae import _MAEDecoder
from .registry import register_named
from .swin_timm import TIMM_SWIN_SIZES

__all__ = ["GreenMIMSwin", "WindowGrouping", "build_grouping", "group_window_attention",
           "make_grouping", "swin_size_ok", "window_keys"]


def _stage_windows(img_size: int, patch_size: int, window_size, num_stages: int) -> list[tuple[int, int, int]]:
    """(resolution, window, shift) per stage, with timm's clamping: a window at least as large
    as the stage becomes the whole stage, unshifted."""
    ws_list = list(window_size) if isinstance(window_size, (list, tuple)) else [window_size] * num_stages
    out = []
    for s in range(num_stages):
        res = img_size // patch_size // 2 ** s
        ws = int(ws_list[s])
        out.append((res, res, 0) if res <= ws else (res, ws, ws // 2))
    return out


def swin_size_ok(img_size: int, patch_size: int, window_size, num_stages: int) -> bool:
    """Whether every stage is tiled by whole windows (no padding) and whole mask units."""
    stride = patch_size * 2 ** (num_stages - 1)
    if img_size <= 0 or img_size % stride:
        return False
    return all(res % ws == 0 for res, ws, _ in _stage_windows(img_size, patch_size, window_size, num_stages))


def window_keys(rows: Tensor, cols: Tensor, sample: Tensor, res: int, window: int, shift: int) -> tuple[Tensor, int]:
    """Window id of tokens at true (row, col) on a ``res x res`` grid, plain or shifted windows.

    With shift s, window boundaries sit at coordinates = s (mod window): the region Swin's
    cyclic roll by -s plus its attention mask lets a token attend to. rows, cols, sample:
    broadcastable int64 tensors. Returns (ids, windows per sample); ids are unique across samples.
    """
    off = (window - shift) % window
    per_side = (res + off + window - 1) // window
    ids = (sample * per_side + (rows + off) // window) * per_side + (cols + off) // window
    return ids, per_side * per_side


@dataclass
class WindowGrouping:
    """Packed layout of one (stage, shift) for group window attention.

    shared: False (per-sample masks: the M = N*n tokens of the batch form one pool, packed
    together) or True (shared mask: each sample's M = n tokens form a pool, all packed alike).
    slot_token: (G*g,) token (index in a pool) held by each slot; padding slots hold token 0.
    token_slot: (M,) slot of each token.
    rel_index: (G, g, g) int, row of [bias table; -inf row] for each slot pair: the relative
    position index for two tokens of one window (and for a padding slot with itself), else
    the -inf row.
    """

    plan: GroupPlan
    shared: bool
    window: int
    slot_token: Tensor
    token_slot: Tensor
    rel_index: Tensor


def build_grouping(ids: Tensor, num_windows: int, rows: Tensor, cols: Tensor, window: int, plan: GroupPlan,
                   shared: bool, table_len: int) -> WindowGrouping:
    """Index tensors of a plan. ids/rows/cols: (M,) per token; num_windows: id range."""
    dev = ids.device
    m = ids.numel()
    g, n_groups = plan.group_size, plan.num_groups
    _, grp, off = plan.members()
    first = torch.from_numpy(grp * g + off).to(dev)                              # (E,) first slot of each window
    sizes = torch.bincount(ids, minlength=num_windows)                           # (W,)
    order = torch.sort(sizes, descending=True, stable=True).indices[: first.numel()]
    win_first = torch.zeros_like(sizes).scatter_(0, order, first)
    ids_sorted, perm = torch.sort(ids, stable=True)
    start = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(ids).scatter_(0, perm, torch.arange(m, device=dev) - start[ids_sorted])
    token_slot = win_first[ids] + rank                                           # (M,)
    n_slots = n_groups * g
    slot_token = torch.full((n_slots,), -1, dtype=torch.long, device=dev).scatter_(
        0, token_slot, torch.arange(m, device=dev))
    pad = slot_token < 0
    slot_token = slot_token.clamp(min=0)
    # Two tokens of one window: |drow|, |dcol| < window, so the flat offset a_i - a_j with
    # a = row * (2 window - 1) + col identifies the table row uniquely.
    span = 2 * window - 1
    a = (rows[slot_token] * span + cols[slot_token]).to(torch.int32).view(n_groups, g)
    slot_id = torch.where(pad, -1 - torch.arange(n_slots, device=dev), ids[slot_token]).to(torch.int32)
    slot_id = slot_id.view(n_groups, g)
    rel = (a + (window - 1) * (span + 1)).unsqueeze(2) - a.unsqueeze(1)        # (G, g, g)
    rel.masked_fill_(slot_id.unsqueeze(2) != slot_id.unsqueeze(1), table_len)
    return WindowGrouping(plan, shared, window, slot_token, token_slot, rel)


def make_grouping(rows: Tensor, cols: Tensor, sample: Tensor, res: int, window: int, shift: int,
                  shared: bool = False, slot_cost: float = 0.0) -> WindowGrouping:
    """Plan and index one (stage, shift) for tokens at true (row, col) of sample ``sample``.

    rows, cols, sample: (M,) int64 in pool order (sample-major, as x is flattened). One
    device-to-host copy; GreenMIMSwin.plan does every stage and shift with a single copy.
    """
    ids, per_sample = window_keys(rows, cols, sample, res, window, shift)
    n_win = (int(sample.max()) + 1) * per_sample
    sizes = torch.bincount(ids, minlength=n_win)
    hist = torch.bincount(sizes, minlength=window * window + 1)[: window * window + 1]
    plan = plan_groups(hist.cpu().numpy(), slot_cost=slot_cost)
    return build_grouping(ids, n_win, rows, cols, window, plan, shared, (2 * window - 1) ** 2)


def group_window_attention(attn: nn.Module, x: Tensor, grouping: WindowGrouping) -> Tensor:
    """timm ``WindowAttention`` weights applied as group window attention.

    x: (N, n, C) visible tokens, unit-major. Returns (N, n, C).
    """
    n, length, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x)
    hd = qkv.shape[-1] // (3 * heads)
    p = n if grouping.shared else 1                                             # pools
    n_groups, g = grouping.plan.num_groups, grouping.plan.group_size
    packed = qkv.reshape(p, -1, 3, heads, hd).index_select(1, grouping.slot_token)
    packed = packed.view(p, n_groups, g, 3, heads, hd)
    # The bias is gathered heads-first from the float32 table (cast afterwards), with rows padded to
    # g8 = g rounded up to 8 (filler columns cut off), so SDPA gets a mask the memory-efficient
    # kernel takes without a copy: unit last stride, every other stride a multiple of 8.
    table_len = attn.relative_position_bias_table.shape[0]
    table = attn.relative_position_bias_table.t()                               # (heads, T)
    table = torch.cat([table, table.new_full((heads, 1), float("-inf"))], dim=1)
    g8 = -(-g // 8) * 8
    rel = F.pad(grouping.rel_index, (0, g8 - g), value=table_len) if g8 != g else grouping.rel_index
    bias = table.index_select(1, rel.reshape(-1)).view(heads, n_groups, g, g8)
    if p == 1:
        q, k, v = packed[0].permute(2, 0, 3, 1, 4).unbind(0)                      # (G, heads, g, hd)
        bias = bias.to(q.dtype).permute(1, 0, 2, 3)                              # (G, heads, g, g8)
    else:  # the batch shares the groups: fold (heads, groups) into the head axis, heads outermost
        q, k, v = packed.permute(3, 0, 4, 1, 2, 5).reshape(3, p, heads * n_groups, g, hd).unbind(0)
        bias = bias.to(q.dtype).view(1, heads * n_groups, g, g8)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[..., :g], dropout_p=drop)
    if p == 1:
        out = out.reshape(p, n_groups, heads, g, hd).permute(0, 1, 3, 2, 4)
    else:
        out = out.reshape(p, heads, n_groups, g, hd).permute(0, 2, 3, 1, 4)
    out = out.reshape(p, n_groups * g, heads * hd)
    out = out.index_select(1, grouping.token_slot).reshape(n, length, heads * hd)
    return attn.proj_drop(attn.proj(out))


class GreenMIMSwin(SwinTransformer, _MAEDecoder, PretrainModel):
    """GreenMIM masked autoencoder with a timm Swin encoder run on visible tokens only.

    forward(imgs (N, 3, H, W), mask (N, L) bool True = masked) -> (loss, pred (N, L, 32*32*3)
    in raster unit order, mask). L = (H/32)**2; every row of ``mask`` must keep
    ``int(L * (1 - mask_ratio))`` units (the original's ``len_keep``: 12 of 49 at 0.75).

    Besides timm's Swin arguments and the decoder's: ``mask_ratio`` fixes the number of
    visible units K (a Python int: no host sync to count them); ``shared_mask`` uses the
    first mask of a batch for every sample (the original's batch-wise masking);
    ``slot_cost`` is the per-slot term of the grouping cost (``models.grouping``);
    ``vis_mask_ratio`` must be 0 (no secondary masking). ``drop_path_rate`` is 0 in
    GreenMIM pretraining.
    """

    family = "greenmim"
    # Each step plans its window groups on the host from the mask (one device-to-host copy, by design),
    # and the group shapes change with every mask: torch.compile breaks the graph there and recompiles
    # every step until its recompile limit, then runs eager anyway.
    compile_note = ("plans its window groups on the host from every step's mask (data-dependent group "
                    "shapes: a graph break and a recompile per step)")
    mask_kind = "random"
    default_mask_ratio = 0.75
    supports_secondary_mask = False
    build_options = ("mask_ratio",)

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 128,
                 depths: Sequence[int] = (2, 2, 18, 2), num_heads: Sequence[int] = (4, 8, 16, 32),
                 window_size=7, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 decoder_embed_dim: int = 512, decoder_depth: int = 1, decoder_num_heads: int = 16,
                 decoder_mlp_ratio: float = 4.0, norm_pix_loss: bool = False, vis_mask_ratio: float = 0.0,
                 mask_ratio: float = 0.75, shared_mask: bool = False, slot_cost: float = 0.0) -> None:
        if vis_mask_ratio > 0:
            raise ValueError(f"GreenMIM has no secondary masking (vis_mask_ratio must be 0, got {vis_mask_ratio})")
        stages = len(depths)
        stride = patch_size * 2 ** (stages - 1)
        if not swin_size_ok(img_size, patch_size, window_size, stages):
            raise ValueError(valid_sizes_message(
                img_size, lambda s: swin_size_ok(s, patch_size, window_size, stages), stride,
                f"GreenMIM Swin (window {window_size}, {stride}-px mask units)"))
        num_units = (img_size // stride) ** 2
        if not 0.0 <= mask_ratio < 1.0 or int(num_units * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio must be in [0, 1) and keep a unit visible (got {mask_ratio})")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
                         window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=True,
                         drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.stride = stride
        self.token_size = img_size // stride
        self.unit_tokens = stride // patch_size
        self.norm_pix_loss = norm_pix_loss
        self.vis_mask_ratio = 0.0
        self.mask_ratio = mask_ratio
        self.num_visible = int(num_units * (1 - mask_ratio))   # the original's len_keep: 12 of 49 at 0.75
        self.shared_mask = shared_mask
        self.slot_cost = slot_cost
        self._build_decoder(self.num_features, self.token_size, stride, in_chans, decoder_embed_dim,
                            decoder_depth, decoder_num_heads, decoder_mlp_ratio, expand=1, cls_token=False)
        self._init_like_the_original()

    def _init_like_the_original(self) -> None:
        """GreenMIM's init pass over the whole model, encoder included: every Linear xavier-uniform with
        zero bias, every convolution xavier-uniform on its (out, in*k*k) view, LayerNorm 1/0,
        ``mask_token`` normal 0.02; the relative-position tables keep timm's trunc-normal 0.02."""
        init_modules(self.modules(), conv="xavier")
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Relative position bias tables and the mask token (GreenMIM's pretraining exclusions)."""
        return set(super().no_weight_decay()) | {"mask_token"}

    def no_weight_decay_pretrain(self) -> set[str]:
        """The contract's ``no_weight_decay``: GreenMIM excludes these from weight decay in pretraining."""
        return self.no_weight_decay()

    # ------------------------------------------------------------------ planning
    def stage_layout(self) -> list[tuple[int, int, int, list[int]]]:
        """Per stage: (unit side in tokens u, grid side, window, shifts used by its blocks)."""
        out = []
        for s, stage in enumerate(self.layers):
            ws = stage.blocks[0].window_size[0]
            shifts = sorted({blk.shift_size[0] for blk in stage.blocks})
            u = self.unit_tokens >> s
            out.append((u, self.token_size * u, ws, shifts))
        return out

    def plan(self, vis: Tensor, mask: Optional[Tensor] = None) -> list[dict[int, WindowGrouping]]:
        """Group layouts of every stage and shift for visible units ``vis`` (D, K) (raster ids, sorted).

        D = N with per-sample masks, 1 with a shared mask. ``mask`` (optional, (N, L)) is
        checked to hide ``L - K`` units in every row, within the same device-to-host copy.
        Returns one {shift: WindowGrouping} per stage.
        """
        dev = vis.device
        d, k = vis.shape
        t = self.token_size
        ur, uc = (vis // t).view(d, k, 1, 1), (vis % t).view(d, k, 1, 1)
        sample = torch.arange(d, device=dev).view(d, 1, 1, 1)
        todo, hists = [], []
        for s, (u, res, ws, shifts) in enumerate(self.stage_layout()):
            i = torch.arange(u, device=dev)
            rows = (ur * u + i.view(1, 1, u, 1)).expand(d, k, u, u).reshape(-1)
            cols = (uc * u + i.view(1, 1, 1, u)).expand(d, k, u, u).reshape(-1)
            for shift in shifts:
                ids, per_sample = window_keys(rows, cols, sample.expand(d, k, u, u).reshape(-1), res, ws, shift)
                sizes = torch.bincount(ids, minlength=d * per_sample)
                hists.append(torch.bincount(sizes, minlength=ws * ws + 1)[: ws * ws + 1])
                todo.append((s, shift, ids, d * per_sample, rows, cols, ws))
        if mask is not None:
            hists.append((mask.sum(1) != mask.shape[1] - k).any().view(1).long())
        host = torch.cat(hists).cpu().numpy()                                    # the one sync of a step
        if mask is not None and host[-1]:
            raise ValueError(f"every mask must hide exactly {mask.shape[1] - k} of {mask.shape[1]} units "
                             f"(mask_ratio {self.mask_ratio}); masks with other counts need a model built "
                             f"with that mask_ratio")
        out: list[dict[int, WindowGrouping]] = [dict() for _ in self.layers]
        pos = 0
        for s, shift, ids, n_win, rows, cols, ws in todo:
            hist = host[pos: pos + ws * ws + 1]
            pos += ws * ws + 1
            plan = plan_groups(hist, slot_cost=self.slot_cost)
            table_len = (2 * ws - 1) ** 2
            out[s][shift] = build_grouping(ids, n_win, rows, cols, ws, plan, self.shared_mask, table_len)
        return out

    # ------------------------------------------------------------------ encoder
    def visible_units(self, mask: Tensor) -> Tensor:
        """mask (N, L) -> raster ids of the visible units, increasing: (N, K)."""
        return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, : self.num_visible]

    def embed_visible(self, imgs: Tensor, vis: Tensor) -> Tensor:
        """Patch-embed only the visible units. imgs (N, C, H, W), vis (N, K) -> (N, K*u*u, C0), unit-major."""
        n, c, _, _ = imgs.shape
        t, p = self.token_size, self.stride
        crops = imgs.view(n, c, t, p, t, p)[torch.arange(n, device=vis.device).view(n, 1), :, vis // t, :, vis % t, :]
        x = self.patch_embed.proj(crops.reshape(-1, c, p, p))                    # (N*K, C0, u, u)
        x = self.patch_embed.norm(x.permute(0, 2, 3, 1))
        return x.reshape(n, -1, x.shape[-1])

    @staticmethod
    def merge_units(downsample: nn.Module, x: Tensor, k: int, u: int) -> Tensor:
        """timm PatchMerging on unit-major tokens: (N, K*u*u, C) -> (N, K*(u/2)**2, 2C)."""
        n, _, c = x.shape
        h = u // 2
        x = x.view(n, k, h, 2, h, 2, c).permute(0, 1, 2, 4, 5, 3, 6).reshape(n, k * h * h, 4 * c)
        return downsample.reduction(downsample.norm(x))

    @staticmethod
    def block_forward(blk: nn.Module, x: Tensor, grouping: WindowGrouping) -> Tensor:
        """A timm SwinTransformerBlock on visible tokens (N, n, C)."""
        x = x + blk.drop_path1(group_window_attention(blk.attn, blk.norm1(x), grouping))
        return x + blk.drop_path2(blk.mlp(blk.norm2(x)))

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """imgs (N, 3, H, W); mask (N, L) bool, True = masked.

        Returns latent (N, K, C_last) after the final norm (one token per visible unit) and the
        visible unit ids vis (N, K), raster order.
        """
        self._check_inputs(imgs, mask)
        mask = mask.bool()
        k = self.num_visible
        vis = self.visible_units(mask)
        groupings = self.plan(vis[:1] if self.shared_mask else vis, mask)
        x = self.embed_visible(imgs, vis)
        layout = self.stage_layout()
        for s, stage in enumerate(self.layers):
            if s:
                x = self.merge_units(stage.downsample, x, k, layout[s - 1][0])
            for blk in stage.blocks:
                x = self.block_forward(blk, x, groupings[s][blk.shift_size[0]])
        return self.norm(x), vis

    def _check_inputs(self, imgs: Tensor, mask: Tensor) -> None:
        check_images_and_mask(self, imgs, mask)

    # ------------------------------------------------------------------ decoder
    def forward_decoder(self, latent: Tensor, vis: Tensor) -> Tensor:
        """latent (N, K, C_last), vis (N, K) -> pred (N, L, 32*32*3), raster unit order.

        Latent k goes to unit vis[:, k] (its true position); every other unit gets the mask token.
        """
        x = self.decoder_embed(latent)
        n, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(n, self.token_size ** 2, d)
        full = full.scatter(1, vis.unsqueeze(-1).expand(-1, -1, d), x)
        return self._decode(full + self.decoder_pos_embed.to(x.dtype))

    def forward(self, imgs: Tensor, mask: Tensor, sm_mask: Optional[Tensor] = None):
        """Returns (loss, pred (N, L, 32*32*3) raster order, mask (N, L) as used).

        With ``shared_mask`` the first row of ``mask`` serves the whole batch and the returned
        mask is that row repeated.
        """
        if sm_mask is not None:
            raise ValueError("GreenMIM has no secondary masking: call forward(imgs, mask)")
        mask = mask.bool()
        if self.shared_mask:
            mask = mask[:1].expand(mask.shape[0], -1)
        latent, vis = self.forward_encoder(imgs, mask)
        pred = self.forward_decoder(latent, vis)
        loss = mae_loss(pred, imgs, mask, self.stride, self.norm_pix_loss)
        return loss, pred, mask

    @torch.no_grad()
    def grouping_stats(self, mask: Tensor) -> list[dict]:
        """For inspection: per (stage, shift), tokens, windows, g, G, padding and certificate of the plans."""
        mask = mask.bool()
        vis = self.visible_units(mask[:1] if self.shared_mask else mask)
        rows = []
        for s, per_shift in enumerate(self.plan(vis)):
            for shift, grp in sorted(per_shift.items()):
                p = grp.plan
                rows.append(dict(stage=s, shift=shift, window=grp.window, tokens=p.tokens, windows=p.windows,
                                 group_size=p.group_size, groups=p.num_groups, padding=p.padding,
                                 certified=p.certified, cost=p.cost, bound=p.bound))
        return rows


# ---------------------------------------------------------------- factories

_SIZES = TIMM_SWIN_SIZES  # GreenMIM's encoders are timm Swins (models/swin_timm.py)


def _register_pretrain(name: str, size: str, window: int, img_size: int, doc: str, **extra) -> None:
    def build(**kwargs) -> GreenMIMSwin:
        return GreenMIMSwin(**{**_SIZES[size], "window_size": window, "img_size": img_size, **extra, **kwargs})
    classifier = f"swin_{size}_patch4_window{window}_{img_size}"
    register_named(name, build, doc, task="pretrain", namespace=globals(), classifier=classifier)


_register_pretrain("greenmim_swin_tiny_patch4_dec512b1", "tiny", 7, 224, "GreenMIM Swin-T, window 7, 224 px.")
_register_pretrain("greenmim_swin_base_patch4_dec512b1", "base", 7, 224,
                   "GreenMIM Swin-B, window 7, 224 px (the original's main model).")
_register_pretrain("greenmim_swin_base_patch4_win14_dec512b1", "base", 14, 224, "GreenMIM Swin-B, window 14, 224 px.")
_register_pretrain("greenmim_swin_large_patch4_win14_dec512b1", "large", 14, 224,
                   "GreenMIM Swin-L, window 14, 224 px.")
_register_pretrain("greenmim_swin_pico_patch4_win6_dec64b1", "pico", 6, 96,
                   "Tiny GreenMIM Swin for tests and demos (96 px, 3x3 units, window 6).",
                   decoder_embed_dim=64, decoder_num_heads=4)
# 32-px variant of the animal-mnist experiment (FINETUNE.md). The mask unit is the last stage's stride,
# so three stages at patch 1 give 4-px units, 8x8 per image (four stages would give 4x4).
register_named("greenmim_swin_pico3_p1_win8_32",
               lambda **kw: GreenMIMSwin(**{"embed_dim": 16, "depths": (2, 2, 2), "num_heads": (1, 2, 4),
                                            "window_size": 8, "img_size": 32, "patch_size": 1,
                                            "decoder_embed_dim": 64, "decoder_num_heads": 4, **kw}),
               "Tiny 3-stage GreenMIM Swin for 32-px images (patch 1, 4-px units, 8x8).", task="pretrain",
               namespace=globals(), classifier="swin_pico3_patch1_window8_32")
