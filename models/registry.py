"""One registry for every model of the framework: ``create_model(name, **kwargs)``.

Each name is tagged with its task: ``"pretrain"`` (masked-image-modeling models,
trained by main_pretrain.py) or ``"classify"`` (classifiers / backbones, trained by
main_finetune.py).
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Optional

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TASKS: dict[str, str] = {}


def _register(fn: Callable[..., nn.Module], task: str) -> Callable[..., nn.Module]:
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODELS[fn.__name__] = fn
    _TASKS[fn.__name__] = task
    return fn


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a classifier / backbone factory under its function name."""
    return _register(fn, "classify")


def register_pretrain_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a pretraining (masked image modeling) factory under its function name."""
    return _register(fn, "pretrain")


def register_named(name: str, build: Callable[..., nn.Module], doc: str, task: str = "pretrain",
                   namespace: Optional[dict] = None) -> Callable[..., nn.Module]:
    """Register ``build`` under a generated ``name`` (factories created in a loop); optionally
    also bind it in a module's ``namespace`` so ``module.name(**kwargs)`` works."""
    def factory(**kwargs):
        return build(**kwargs)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    _register(factory, task)
    if namespace is not None:
        namespace[name] = factory
    return factory


def list_models(pattern: str = "*", task: Optional[str] = None) -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern) and (task is None or _TASKS[n] == task))


def model_task(name: str) -> str:
    return _TASKS[name]


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; an unknown name lists the valid ones."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
