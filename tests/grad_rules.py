"""Which parameters may legitimately have an all-zero gradient, and why.

A test that asserts "every parameter gets a non-zero gradient" must not depend on floating-point
rounding: a parameter whose exact gradient is zero by construction gets a rounding residue that
may or may not be exactly 0.0. Those parameters are exempted here, each with the reason.
"""
from __future__ import annotations

import re

import torch

# name pattern -> why its exact gradient is zero
ZERO_BY_CONSTRUCTION = {
    # The position MLP (1x1 conv 2 -> hidden, ReLU, 1x1 conv -> heads) turns every (query, key) offset
    # into one logit bias per head. Its last bias b_h is added to *every* logit of head h, i.e. a
    # constant per softmax row, and softmax(z + c) == softmax(z): d loss / d b_h = sum_j dL/dz_ij = 0.
    r"(^|\.)attn\.posmlp\.2\.bias$":
        "last bias of the position MLP: a constant added to every logit of a softmax row",
}


SINGLE_KEY = ("position-bias MLP of an attention whose windows hold one token at this input size: "
              "softmax over a single key is 1 whatever its logit")


def exemption(name: str, single_key: frozenset[str] = frozenset()) -> str | None:
    """The reason ``name`` may have a zero gradient, or None if it must get a non-zero one.
    single_key: prefixes of attention modules that ran on one-token windows (see ``watch_single_key``)."""
    for pattern, why in ZERO_BY_CONSTRUCTION.items():
        if re.search(pattern, name):
            return why
    if any(name.startswith(prefix + ".posmlp.") for prefix in single_key):
        return SINGLE_KEY
    return None


def watch_single_key(model: torch.nn.Module) -> set[str]:
    """Hooks on every position-MLP attention (x: (B*nW, n, C)); the returned set fills, during the
    forward, with the names of those that saw windows of n == 1 token."""
    seen: set[str] = set()
    for name, mod in model.named_modules():
        if hasattr(mod, "posmlp"):
            def hook(m, args, name=name):
                if args[0].dim() == 3 and args[0].shape[1] == 1:
                    seen.add(name)
            mod.register_forward_pre_hook(hook)
    return seen


def silent_parameters(model: torch.nn.Module, single_key: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Trainable parameters without a finite, non-zero gradient that no exemption covers."""
    bad = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None or not torch.isfinite(p.grad).all():
            bad.append(n)   # even exempted parameters take part in the graph: a gradient must exist
        elif not p.grad.any() and exemption(n, frozenset(single_key)) is None:
            bad.append(n)
    return bad
