"""Layer-wise learning-rate decay parameter groups (BEiT / MAE style, the reference's layer ids).

Layer ids for the Swin, PVT and ViT models of this framework:
  * 0: ``cls_token``, ``pos_embed``, ``patch_embed.*``;
  * i + 1: ``blocks.i.*`` (the patch merging owned by block i shares its id);
  * ``num_layers = len(blocks) + 1``: everything else (``fc_norm``, ``head``, ...).
Each classifier states its rule in its contract (``model.contract.num_layers`` and
``layer_id``, models.contract). Scale = decay ** (num_layers - id). No weight decay for 1-D
tensors and the contract's ``no_weight_decay`` names.
"""
from __future__ import annotations

from torch import nn


def num_layers_for_decay(model: nn.Module) -> int:
    return model.contract.num_layers


def layer_id(model: nn.Module, name: str, num_layers: int) -> int:
    return model.contract.layer_id(name)


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float,
                     no_weight_decay_list: set[str] | None = None) -> list[dict]:
    """Optimizer groups with ``lr_scale`` (read by engine.schedule) and weight decay per parameter."""
    contract = model.contract
    if no_weight_decay_list is None:
        no_weight_decay_list = contract.no_weight_decay
    n = contract.num_layers
    scales = [layer_decay ** (n - i) for i in range(n + 1)]
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in no_weight_decay_list
        lid = contract.layer_id(name)
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "lr_scale": scales[lid], "layer_id": lid,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
