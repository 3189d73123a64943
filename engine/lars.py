"""LARS as MAE's linear probe uses it (You et al. 2017; MAE's recipe: momentum 0.9, trust 0.001).

For every parameter p with gradient g, per step:

    if p.ndim > 1:                       # weights only; biases and other 1-D tensors skip both
        d = g + weight_decay * p         # decoupled into the update, as MAE's LARS
        q = trust * ||p|| / ||d||        # 1 when either norm is 0
        d = q * d
    else:
        d = g
    mu = momentum * mu + d               # mu starts at 0, so the first step uses d
    p  = p - lr * mu

The trust ratio is applied even when weight_decay is 0 (MAE's probe runs with weight decay 0:
the adaptation, not the decay, is what makes lr 0.1 x batch/256 work). timm's ``Lars`` with its
defaults is not this: momentum 0 and no trust ratio without weight decay (plain SGD).
"""
from __future__ import annotations

from typing import Iterable

import torch


class LARS(torch.optim.Optimizer):
    """LARS with MAE's conventions. params: tensors or param groups; lr is read per group (the
    schedule in engine.schedule sets it every step)."""

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1, trust_coefficient > 0 "
                             f"(got {lr}, {weight_decay}, {momentum}, {trust_coefficient})")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(d_norm > 0, group["trust_coefficient"] * p_norm / d_norm,
                                                            one), one)
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss
