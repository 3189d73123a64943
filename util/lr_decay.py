"""Layer-wise learning-rate decay parameter groups (BEiT / MAE style, the reference's layer ids).

Layer ids for the Swin, PVT and ViT models of this framework (spec §5.2):
  * 0: ``cls_token``, ``pos_embed``, ``patch_embed.*``;
  * i + 1: ``blocks.i.*`` (the patch merging owned by block i shares its id);
  * ``num_layers = len(blocks) + 1``: everything else (``fc_norm``, ``head``, ...).
A model with another layout defines ``lrd_num_layers()`` and ``lrd_layer_id(name)``.
Scale = decay ** (num_layers - id). No weight decay for 1-D tensors and names in
``no_weight_decay()``.
"""
from __future__ import annotations

from torch import nn


def num_layers_for_decay(model: nn.Module) -> int:
    if hasattr(model, "lrd_num_layers"):
        return model.lrd_num_layers()
    return len(model.blocks) + 1


def layer_id(model: nn.Module, name: str, num_layers: int) -> int:
    if hasattr(model, "lrd_layer_id"):
        return model.lrd_layer_id(name)
    if name in ("cls_token", "pos_embed", "mask_token", "vis_mask_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float,
                     no_weight_decay_list: set[str] | None = None) -> list[dict]:
    """Optimizer groups with ``lr_scale`` (read by util.lr_sched) and weight decay per parameter."""
    if no_weight_decay_list is None:
        no_weight_decay_list = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    n = num_layers_for_decay(model)
    scales = [layer_decay ** (n - i) for i in range(n + 1)]
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in no_weight_decay_list
        lid = layer_id(model, name, n)
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "lr_scale": scales[lid], "layer_id": lid,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
