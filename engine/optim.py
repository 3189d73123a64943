"""Optimizers and their parameter groups: layer-wise lr decay (BEiT / MAE style, the reference's
layer ids) and AdamW as every program builds it.

Layer ids come from the classifier's contract (``contract.num_layers`` and ``contract.layer_id``,
models.contract); for the Swin, PVT and ViT models of this framework:
  * 0: ``cls_token``, ``pos_embed``, ``patch_embed.*``;
  * i + 1: ``blocks.i.*`` (the patch merging owned by block i shares its id);
  * ``num_layers = len(blocks) + 1``: everything else (``fc_norm``, ``head``, ...).
Scale = decay ** (num_layers - id). No weight decay for 1-D tensors and the contract's
``no_weight_decay`` names. Groups carry ``lr_scale``, which the step loop applies to the scheduled lr.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn


def fused_optimizer_ok(device: torch.device) -> bool:
    """The fused (single-kernel) AdamW runs on CPU and CUDA; on a 2-core CPU it takes Swin-T's
    optimizer step from ~140 ms (per-parameter loop) to ~11 ms."""
    return device.type in ("cpu", "cuda")


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float, body: Optional[nn.Module] = None,
                     no_weight_decay: Iterable[str] = (), rule: str = "classifier") -> list[dict]:
    """Optimizer groups of ``model``'s trainable parameters with ``lr_scale`` and weight decay.

    ``body``: the classifier inside ``model`` whose contract gives the layer ids (default: ``model``
    itself); parameters outside it (a dense model's adapters, neck and heads) take the top id, scale 1.
    ``no_weight_decay``: more parameters left undecayed, by any part of their name. ``rule``: which
    parameters are not decayed (DECAY_RULES)."""
    if rule not in DECAY_RULES:
        raise ValueError(f"weight-decay rule {rule!r}: valid choices are {', '.join(DECAY_RULES)}")
    body = model if body is None else body
    contract = body.contract
    n = contract.num_layers
    scales = [layer_decay ** (n - i) for i in range(n + 1)]
    body_names = {id(p): name for name, p in body.named_parameters()}
    extra = tuple(no_weight_decay)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        own = body_names.get(id(p))
        lid = contract.layer_id(own) if own is not None else n
        if rule == "classifier":
            no_decay = p.ndim == 1 or own in contract.no_weight_decay
        elif rule == "mmdet":
            no_decay = name.endswith(".bias") or (own is not None and (p.ndim == 1 or own in contract.no_weight_decay))
        else:  # beit
            no_decay = p.ndim == 1 or name.endswith(".bias")
        no_decay = no_decay or any(k in name for k in extra)
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "lr_scale": scales[lid], "layer_id": lid,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


# Which parameters are not decayed:
#   * "classifier": 1-D tensors (norms, biases) and the contract's ``no_weight_decay`` names;
#   * "mmdet" (detection; mmdet's ``custom_keys`` pos_embed / norm / bias, matched against the reference's
#     parameter names): the body's 1-D tensors and ``no_weight_decay`` names, and every bias. Norm weights
#     outside the body (adapter LayerNorms, FPN BatchNorms, head GroupNorms) are decayed: the reference
#     names them ``upK.0``, ``bn``, ``gn``, which match none of the keys;
#   * "beit" (segmentation; the BEiT layer-decay constructor): every 1-D tensor and every bias; everything
#     else is decayed, ``pos_embed`` included (that constructor compares ``'pos_embed'`` with the full
#     name ``backbone.pos_embed``, which never matches).
# Names containing any of ``no_weight_decay`` are never decayed.
DECAY_RULES = ("classifier", "mmdet", "beit")


def dense_param_groups(model: nn.Module, backbone: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                       no_weight_decay: tuple[str, ...] = (), rule: str = "mmdet") -> list[dict]:
    """``param_groups_lrd`` of a dense model (detector, segmenter) holding ``backbone``
    (models.dense.DenseBackbone): its classifier's layer ids, scale 1 for everything else, weight
    decay after the reference's constructor of the task (``rule``: "mmdet" or "beit")."""
    return param_groups_lrd(model, weight_decay, layer_decay, body=backbone.body, no_weight_decay=no_weight_decay,
                            rule=rule)


def make_adamw(groups: list[dict], lr: float, device: torch.device,
               betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over ``groups`` (fused where it runs)."""
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused_optimizer_ok(device) or None)
