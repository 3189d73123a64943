"""timm's Swin Transformer as a classifier: the finetuning models of GreenMIM checkpoints.

GreenMIM pretrains a timm ``SwinTransformer`` encoder (models/greenmim.py), so its checkpoints
finetune into timm's Swin with the same parameter names; ``SwinClassifier`` adds the layer ids
of the layer-wise lr decay. ``TIMM_SWIN_SIZES`` is the size table of both (the Swin sizes of
models/swin.py, without its position-MLP width: timm's Swin has relative-position tables).
"""
from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer

from .contract import Classifier
from .registry import Variant, register
from .swin import SWIN_SIZES

TIMM_SWIN_SIZES = {size: {k: v for k, v in SWIN_SIZES[size].items() if k != "posmlp_dim"}
                   for size in ("pico", "tiny", "base", "large")}


class SwinClassifier(SwinTransformer, Classifier):
    """timm ``SwinTransformer`` with the layer ids of the layer-wise lr decay.

    Layer ids follow the SimMIM fine-tuning code that GreenMIM's checkpoints were fine-tuned
    with, translated to timm's layout:
      * 0: ``patch_embed.*`` (and an absolute position embedding, if any);
      * ``b + 1`` for the b-th block counted over all stages (``layers.s.blocks.j``:
        ``b = depths[0] + ... + depths[s-1] + j``);
      * ``layers.s.downsample.*`` (timm puts the patch merging at the start of stage s; the
        Microsoft/SimMIM layout at the end of stage s-1) shares the id of the block it
        follows, the last block of stage s-1, i.e. ``depths[0] + ... + depths[s-1]``;
      * ``num_layers = sum(depths) + 1``: the final ``norm`` and the ``head``.
    ``no_weight_decay()`` (timm's): every relative position bias table.
    """

    family = "swin-timm"
    head_path = "head.fc"

    def native_size(self) -> int:
        return int(self.patch_embed.img_size[0])

    def lrd_num_layers(self) -> int:
        return sum(len(stage.blocks) for stage in self.layers) + 1

    def lrd_layer_id(self, param_name: str) -> int:
        if param_name.startswith(("patch_embed.", "absolute_pos_embed", "pos_embed", "mask_token")):
            return 0
        if param_name.startswith("layers."):
            parts = param_name.split(".")
            s = int(parts[1])
            before = sum(len(self.layers[i].blocks) for i in range(s))
            if parts[2] == "blocks":
                return before + int(parts[3]) + 1
            if parts[2] == "downsample":
                return before
        return self.lrd_num_layers()


VARIANTS = {
    "swin_tiny_patch4_window7_224": Variant(dict(TIMM_SWIN_SIZES["tiny"], window_size=7, img_size=224, patch_size=4),
                                            "timm Swin-T, window 7 (GreenMIM fine-tuning)."),
    "swin_base_patch4_window7_224": Variant(dict(TIMM_SWIN_SIZES["base"], window_size=7, img_size=224, patch_size=4),
                                            "timm Swin-B, window 7 (GreenMIM fine-tuning)."),
    "swin_base_patch4_window14_224": Variant(dict(TIMM_SWIN_SIZES["base"], window_size=14, img_size=224,
                                                  patch_size=4), "timm Swin-B, window 14 (GreenMIM fine-tuning)."),
    "swin_large_patch4_window14_224": Variant(dict(TIMM_SWIN_SIZES["large"], window_size=14, img_size=224,
                                                   patch_size=4), "timm Swin-L, window 14 (GreenMIM fine-tuning)."),
    "swin_pico_patch4_window6_96": Variant(dict(TIMM_SWIN_SIZES["pico"], window_size=6, img_size=96, patch_size=4),
                                           "Tiny timm Swin (tests; loads the pico GreenMIM encoder)."),
    # 32-px classifier of the animal-mnist experiment (FINETUNE.md): patch 1, three stages, window 8.
    "swin_pico3_patch1_window8_32": Variant(dict(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=8,
                                                 img_size=32, patch_size=1),
                                            "Tiny 3-stage timm Swin for 32-px images (loads "
                                            "greenmim_swin_pico3_p1_win8_32)."),
}
register(SwinClassifier, VARIANTS)
